"""Named crash points for the crash-safety tests.

`PCBO_FAILPOINT=<name>@<partition index>` makes the process exit abruptly (os._exit, no clean-up,
like a kill) when execute reaches that point for that partition. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os

CRASH_EXIT_STATUS = 86


def reached(name: str, partition_index: int) -> None:
    spec = os.environ.get("PCBO_FAILPOINT")
    if spec and spec == f"{name}@{partition_index}":
        os._exit(CRASH_EXIT_STATUS)
