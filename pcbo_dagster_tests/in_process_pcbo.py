"""`pcbo` run in the test process (`cli.main`), for the steps of a test whose point is not the process
boundary: the same `PcboRun` (status, stdout as JSON, stderr) as `cli_runner.run_pcbo`, with the
environment that function gives a subprocess (ours without `PCBO_*`, plus PCBO_HOME and `env`) and its
working directory, both restored afterwards, as is what the CLI sets on the object store clients'
loggers (`quiet_store_client_logs`: no handler, no propagation), which would outlast the test. Saves
the ~1-2 s a fresh interpreter spends importing.

Never with `PCBO_FAILPOINT` (a failpoint ends its process with `os._exit`): a crash stays a subprocess
(`run_pcbo`)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from pcbo_dagster.cli import main as cli
from pcbo_dagster.io.redaction import _OBJECT_STORE_CLIENTS
from pcbo_dagster_tests.cli_runner import PcboRun, pcbo_env


def run_pcbo_in_process(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> PcboRun:
    """`pcbo ARGS` as `run_pcbo(args, home, env, cwd)` would run it, in this process."""
    assert "PCBO_FAILPOINT" not in (env or {}), "a failpoint ends its process: use run_pcbo"
    if cwd is None:
        cwd = Path(home).parent if home is not None else Path.cwd()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    loggers = [logging.getLogger(name.rstrip(".")) for name in _OBJECT_STORE_CLIENTS]
    saved_loggers = [(logger, list(logger.handlers), logger.propagate) for logger in loggers]
    out, err = io.StringIO(), io.StringIO()
    try:
        child_env = pcbo_env(home, env)
        os.environ.clear()
        os.environ.update(child_env)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main([os.fspath(a) for a in args])
            except SystemExit as exc:  # argparse refused the arguments (its message printed)
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        for logger, handlers, propagate in saved_loggers:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    stdout = out.getvalue()
    try:
        document = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        document = None
    return PcboRun(status, document, err.getvalue())
