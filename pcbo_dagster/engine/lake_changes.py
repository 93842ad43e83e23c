"""Lake changes announced to whoever listens: the hook an orchestrator uses to stay in step with the
lake (no Dagster here).

The engine announces every partition it changes in the lake - committed, restored, healed, rolled back
or repaired - once the change is complete (`announce`, called by `execute`, `rollback` and
`verify --repair`). Nobody listens by default. A listener (`listening`) is installed by a process that
changes the lake outside an orchestrator's own record of it: the `pcbo` CLI when a Dagster instance is
configured (`DAGSTER_HOME`; `dagster_defs/instance_reporting.py` reports the partitions' new state to
it), and the Dagster ops that roll back or repair (their changes are not asset materializations).

A listener that fails never fails the change it hears about (the lake is already changed, the chain
already says so): the failure is written to stderr, and the `lake_drift` sensor finds what was not
reported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: What happened to the partitions (`LakeChange.action`).
COMMITTED = "committed"
ROLLED_BACK = "rolled_back"
REPAIRED = "repaired"


@dataclass(frozen=True)
class LakeChange:
    """Partitions of one dataset version whose commit point changed (or was completed)."""

    dataset: str
    version_label: str
    keys: tuple[str, ...]
    action: str
    #: Who changed it: the command (`pcbo rollback`, `pcbo verify --repair`, ...) or the run.
    by: str = "pcbo"


#: Called with the still open environment (to read what the lake holds now) and the change.
Listener = Callable[[Any, LakeChange], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """`listener` hears every change announced in this process while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def announce(env: Any, dataset: str, version_label: str, keys: Sequence[str], action: str) -> None:
    """Tell the listeners (if any) that `keys` changed; a listener's error is reported, not raised."""
    if not keys or not _listeners:
        return
    change = LakeChange(dataset, version_label, tuple(dict.fromkeys(keys)), action, _actor())
    for listener in list(_listeners):
        try:
            listener(env, change)
        except Exception as exc:  # noqa: BLE001 - the change is done; reporting it is best effort
            print(
                f"pcbo: could not report the change of {len(change.keys)} partition(s) of "
                f"{dataset}/{version_label} ({action}): {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )


_actor_name: list[str] = []


@contextmanager
def acting_as(name: str) -> Iterator[None]:
    """Changes announced in the block name `name` as who made them."""
    _actor_name.append(name)
    try:
        yield
    finally:
        _actor_name.pop()


def _actor() -> str:
    return _actor_name[-1] if _actor_name else "pcbo"
