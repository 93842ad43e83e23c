"""Returning freed memory to the system between the steps of a large evaluation."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

import pyarrow as pa


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Hand the memory freed by a batch back to the system (glibc's heap, Arrow's pool), so that
    what a batch freed does not stay resident, pinned by a few long-lived allocations."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    pa.default_memory_pool().release_unused()
