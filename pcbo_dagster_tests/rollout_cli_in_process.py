"""Run the `pcbo` command line in this process, as `run_pcbo` runs it in a subprocess: same arguments,
same `PcboRun` (status, document, stderr), same environment rules (every `PCBO_*` variable of ours
dropped, PCBO_HOME=`home` and `env` added, `cwd` the working directory), without a new interpreter
and its imports (about half a second a command). For steps whose point is not the process boundary:
a failpoint that ends the process, a kill or a second process running at the same time need
`run_pcbo`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from pcbo_dagster_tests.cli_runner import PcboRun


def run_pcbo_in_process(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> PcboRun:
    """`pcbo *args` in this process with PCBO_HOME=`home` and `env`, in `cwd` (default: `home`'s
    parent, as `run_pcbo`); the process's environment and working directory restored after."""
    from pcbo_dagster.cli.main import main

    if cwd is None:
        cwd = Path(home).parent if home is not None else Path.cwd()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        for name in [k for k in os.environ if k.startswith("PCBO_")]:
            del os.environ[name]
        if home is not None:
            os.environ["PCBO_HOME"] = os.fspath(home)
        os.environ.update(env or {})
        os.chdir(cwd)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                status = main([os.fspath(a) for a in args])
            except SystemExit as exc:  # argparse refusing a flag, as `run` maps it
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=err)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    stdout = out.getvalue()
    try:
        document = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        document = None
    return PcboRun(status, document, err.getvalue())
