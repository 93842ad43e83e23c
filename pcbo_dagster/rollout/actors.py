"""Who does a rollout step: the `--by` of `pcbo rollout start|pause|resume|cancel|promote|rollback`
and the Dagster jobs' `by`.

It is recorded as given on the production audit chain and in the catalog, and shown in logs, the
Dagster UI, reports and alert receivers: a line break, a terminal escape or a bidirectional override
in it would forge a line (or text) of its own there. So it must name someone and be one printable
line (`str.isprintable`: no control, format or separator character but the plain space).
"""

from __future__ import annotations

from pcbo_dagster.core.errors import InvalidInput


def check_actor(by: object, doing: str) -> None:
    """`InvalidInput` naming `by` unless `by` is text naming who is `doing` the step (not blank) on one
    printable line."""
    if not isinstance(by, str) or not by.strip():
        raise InvalidInput("by", f"say who {doing} (a name or an e-mail address)")
    if not by.isprintable():
        raise InvalidInput(
            "by",
            f"{by!r} holds a control character (a line break, a tab, an escape or a direction "
            "override): it is recorded and shown as given; give a name or an e-mail address",
        )
