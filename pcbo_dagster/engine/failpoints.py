"""Named crash points for the crash-safety tests.

`PCBO_FAILPOINT=<name>@<partition index>` makes the process exit abruptly (os._exit, no clean-up,
like a kill) when execute, a rollback or `pcbo gc` reaches that point for that partition;
`<name>@<partition index>:stop` freezes it there instead (SIGSTOP to itself, every thread: a host
paused past its lease), until a SIGCONT. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_EXIT_STATUS = 86


def reached(name: str, partition_index: int) -> None:
    spec = os.environ.get("PCBO_FAILPOINT")
    if not spec:
        return
    if spec == f"{name}@{partition_index}":
        os._exit(CRASH_EXIT_STATUS)
    if spec == f"{name}@{partition_index}:stop":
        os.kill(os.getpid(), signal.SIGSTOP)
