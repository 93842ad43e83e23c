"""Run the `pcbo` command line in the test's own process: `cli.main` with the environment, working
directory and output streams a `run_pcbo` subprocess gets, for tests whose claim is not about the
process boundary (no kill -9, no timeout, no interpreter warnings). It saves the ~2 s a subprocess
spends importing pcbo, pyiceberg, DuckDB and Arrow.

What the subprocess would show on its stdout and stderr is captured at both levels: Python's
`sys.stdout`/`sys.stderr`, the file descriptors 1 and 2 (what a native library writes) and what the
logging module would print through its last-resort handler (pytest's own handlers take the root
logger's records otherwise). pyiceberg keeps the manifests it read in a process-wide cache keyed by
their path (`pyiceberg.manifest._manifest_cache`): a command in a fresh process reads them from the
files, so the cache is emptied before and after each command (a test that rewrote a manifest list, or
changed a cached entry while forging one, would otherwise be judged from the cache).

The exit status is `main`'s, or that of the `SystemExit` argparse raises, or 1 with the traceback on
stderr for an exception `main` lets through (as `PCBO_DEBUG` does).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pcbo_dagster_tests.cli_runner import PcboRun, pcbo_env


@contextlib.contextmanager
def _descriptor_captured(fd: int) -> Iterator[io.BytesIO]:
    """Whatever is written to file descriptor `fd` while the block runs, in the yielded buffer."""
    captured = io.BytesIO()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield captured
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read())


def run_pcbo_here(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> PcboRun:
    """`run_pcbo(args, home, env, cwd)`, in this process: `PcboRun(status, document, stderr)`."""
    from pyiceberg.manifest import clear_manifest_cache

    from pcbo_dagster.cli.main import main

    if cwd is None:
        cwd = Path(home).parent if home is not None else Path.cwd()
    saved_environ, saved_cwd = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)  # what Python prints for a process without handlers
    last_resort.setLevel(logging.WARNING)
    root = logging.getLogger()
    os.environ.clear()
    os.environ.update(pcbo_env(home, env))
    os.chdir(cwd)
    root.addHandler(last_resort)
    clear_manifest_cache()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with (
            _descriptor_captured(1) as native_out,
            _descriptor_captured(2) as native_err,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                status = main([os.fspath(a) for a in args])
            except SystemExit as exc:  # as `cli.main.run` turns it into a status
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except Exception:  # an uncaught exception: its traceback, status 1
                traceback.print_exc()
                status = 1
    finally:
        clear_manifest_cache()
        root.removeHandler(last_resort)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environ)
    stdout = out.getvalue() + native_out.getvalue().decode("utf-8", errors="replace")
    stderr = err.getvalue() + native_err.getvalue().decode("utf-8", errors="replace")
    try:
        document = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        document = None
    return PcboRun(status, document, stderr)
