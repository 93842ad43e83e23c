"""Secrets that authenticate rows pcbo keeps in the catalog (someone who can write the catalog cannot
forge them): one mechanism, one key per use.

`host_secret(home, variable, file)` is the SHA-256 of the environment variable `variable` when it is
set (hosts that share a catalog's rows share that variable), else 32 random bytes kept in
`home/file` (made on first use, mode 0600, in a 0700 directory; never logged). Its users:

* the zone indexes of streamed sources (`catalog/source_indexes.py`): `PCBO_SOURCE_INDEX_KEY`,
  `$PCBO_HOME/.keys/source-index.key`;
* the alerts (`alerts/rows.py`): `PCBO_ALERT_KEY`, `$PCBO_HOME/.keys/alert.key`.

A secret that hosts must share, with no per-home fallback (`variable_secret`): the Celery steps'
messages and results (`dagster_defs/celery_signing.py`), `PCBO_CELERY_KEY`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from pcbo_dagster.io.atomic_files import create_file


def variable_secret(variable: str, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The SHA-256 of the environment variable `variable`; None when it is unset or empty."""
    env = os.environ if environ is None else environ
    given = env.get(variable)
    return hashlib.sha256(given.encode("utf-8")).digest() if given else None


def host_secret(home: Path, variable: str, file: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The secret of `variable` (module doc), else of the key file `home/file` (made on first use)."""
    given = variable_secret(variable, environ)
    if given is not None:
        return given
    path = home / file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Written whole and linked into place (`create_file`): a process reading it never sees it half
        # written, and the first link wins (the others read the winner's key).
        create_file(path, os.urandom(32), durable=True, mode=0o600)
        data = path.read_bytes()
    if len(data) != 32:
        from pcbo_dagster.core.errors import InvalidInput

        raise InvalidInput(variable, f"{path} is not a 32-byte key: remove it (a new one is made)")
    return data
