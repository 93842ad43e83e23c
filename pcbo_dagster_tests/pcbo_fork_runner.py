"""Run `pcbo` as a real process without paying the interpreter's start and pcbo's imports each time.

`PcboForkServer` starts one `python` that imports `pcbo_dagster.cli.main` and the modules its commands
import (`PRELOAD`) once (no command runs, no cache is filled, no thread started); each `run_pcbo` then
forks it into a process of its own that becomes `python -m pcbo_dagster.cli.main *args`: its own
working directory, its own environment (`cli_runner.pcbo_env`, every `PCBO_*` of ours dropped), its
own standard input, output and error (files), the module run as `__main__` (`runpy`, as `-m` does)
and ended by pcbo's own `run()` (`os._exit` with its status) or, should something escape it, by a
traceback on stderr and status 1 as the interpreter would. What the parent wrote on stderr while
importing (a warning) is put in front of every run's stderr, as each fresh process would have printed
it. The answer is the same `PcboRun` as `cli_runner.run_pcbo`'s: exit status (negative: the signal
that ended it), stdout's JSON, stderr.

Only for commands whose point is not the interpreter's own start (every bad command line of a table).
A test calls `run_pcbo_forked` (as it would `cli_runner.run_pcbo`): one fork server per test process
(per xdist worker), started at its first call.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pcbo_dagster_tests.cli_runner import PcboRun, pcbo_env, run_cwd, stdout_document

_SERVER = r"""
import json, os, runpy, signal, sys, time, traceback

import importlib
import pcbo_dagster.cli.main  # noqa: F401  (its imports: what every run shares)
for name in sys.argv[1:]:  # and what its commands import when they run
    importlib.import_module(name)
import gc
gc.freeze()  # the children's collections never walk (and so copy) what the imports built
sys.stderr.flush()
ready = os.dup(1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nothing a child writes reaches our protocol
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
os.write(ready, b"ready\n")
for line in sys.stdin:
    job = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            os.chdir(job["cwd"])
            os.environ.clear()
            os.environ.update(job["env"])
            for fd, path, flags in (
                (0, job["stdin"], os.O_RDONLY),
                (1, job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                (2, job["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            ):
                opened = os.open(path, flags, 0o600)
                os.dup2(opened, fd)
                os.close(opened)
            os.close(ready)
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.argv = ["-m", *job["argv"]]
            # as under -m: the module's imports are there, the module itself is not (runpy runs it)
            del sys.modules["pcbo_dagster.cli.main"]
            vars(sys.modules["pcbo_dagster.cli"]).pop("main", None)
            try:
                runpy.run_module("pcbo_dagster.cli.main", run_name="__main__", alter_sys=True)
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:
                traceback.print_exc()
                status = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    deadline = time.monotonic() + job["timeout"]
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            answer = {"status": os.waitstatus_to_exitcode(wait_status)}
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            answer = {"timeout": True}
            break
        time.sleep(0.005)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything the command left running
    except OSError:
        pass
    os.write(ready, (json.dumps(answer) + "\n").encode())
"""


#: The modules pcbo's commands import as they start: imported once, before the forks, instead of by
#: each. None reads a `PCBO_*` or `AWS_*` variable as it is imported (pyiceberg reads `PYICEBERG_*`
#: ones and fsspec `FSSPEC_*` ones, which no test sets: the parent's environment is the children's but
#: for what a test gives a run).
PRELOAD = (
    "dagster._utils.schedules",  # a datasets config's cron is checked by it
    "pyiceberg.catalog.sql",  # a published table's catalog
    "pyiceberg.io.pyarrow",
    "s3fs",  # an S3 lake or audit store
    "psycopg",  # a PostgreSQL catalog
    "pcbo_dagster.engine.execute",
    "pcbo_dagster.tables.iceberg_publication",
    "pcbo_dagster.datasets.config",
    "pcbo_dagster.engine.backfill_commands",
    "pcbo_dagster.engine.environment",
    "pcbo_dagster.engine.rollback",
    "pcbo_dagster.engine.transparency_log",
    "pcbo_dagster.engine.verify",
    "pcbo_dagster.rollout.operations",
    "pcbo_dagster.server.app",
    "pcbo_dagster.tables.query",
)


class PcboForkServer:
    """One importing `python`, forked into a fresh `pcbo` process per `run_pcbo`."""

    def __init__(self) -> None:
        self._scratch = Path(tempfile.mkdtemp(prefix="pcbo-fork-"))
        import_err = self._scratch / "import.err"
        with import_err.open("wb") as err:
            self._server = subprocess.Popen(
                [sys.executable, "-c", _SERVER, *PRELOAD],
                env=pcbo_env(),
                cwd=self._scratch,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
            )
        assert self._server.stdout is not None
        if self._server.stdout.readline() != b"ready\n":  # it could not import pcbo: say why
            self._server.kill()
            self._server.wait()
            message = import_err.read_text()
            shutil.rmtree(self._scratch, ignore_errors=True)
            raise RuntimeError(f"the pcbo process to fork from did not start: {message}")
        self._import_stderr = import_err.read_text()
        self._count = 0

    def run_pcbo(
        self,
        args: Sequence[str | os.PathLike[str]],
        home: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float = 120.0,
        stdin: bytes | None = None,
    ) -> PcboRun:
        """As `cli_runner.run_pcbo` (`stdin` None: an empty standard input)."""
        self._count += 1
        out = self._scratch / f"{self._count}.out"
        err = self._scratch / f"{self._count}.err"
        stdin_path = os.devnull
        if stdin is not None:
            stdin_path = str(self._scratch / f"{self._count}.in")
            Path(stdin_path).write_bytes(stdin)
        argv = [os.fspath(a) for a in args]
        job = {
            "argv": argv,
            "env": pcbo_env(home, env),
            "cwd": os.fspath(run_cwd(home, cwd)),
            "stdin": stdin_path,
            "out": str(out),
            "err": str(err),
            "timeout": timeout,
        }
        assert self._server.stdin is not None and self._server.stdout is not None
        self._server.stdin.write((json.dumps(job) + "\n").encode())
        self._server.stdin.flush()
        answer = json.loads(self._server.stdout.readline())
        if answer.get("timeout"):
            raise subprocess.TimeoutExpired(argv, timeout)
        stdout = out.read_bytes().decode("utf-8", errors="replace")
        stderr = self._import_stderr + err.read_bytes().decode("utf-8", errors="replace")
        return PcboRun(answer["status"], stdout_document(stdout), stderr)

    @property
    def gone(self) -> bool:
        """Whether the process to fork from has ended (a test's kill reached it)."""
        return self._server.poll() is not None

    def close(self) -> None:
        assert self._server.stdin is not None
        self._server.stdin.close()
        try:
            self._server.wait(timeout=30)
        finally:
            if self._server.poll() is None:
                self._server.kill()
                self._server.wait()
            shutil.rmtree(self._scratch, ignore_errors=True)


_shared: PcboForkServer | None = None


def run_pcbo_forked(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    stdin: bytes | None = None,
) -> PcboRun:
    """`cli_runner.run_pcbo`, the process forked from this test process's fork server: started at the
    first call (again should it have gone), closed when this process exits."""
    global _shared
    if _shared is None or _shared.gone:
        _shared = PcboForkServer()
        atexit.register(_shared.close)
    return _shared.run_pcbo(args, home, env, cwd, timeout, stdin)
