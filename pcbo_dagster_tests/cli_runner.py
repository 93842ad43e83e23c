"""Run the `pcbo` command line as a real subprocess, the way a user or a script does (or, where the
process boundary is not the point, in this process: `run_pcbo_in_process`).

`run_pcbo(["execute", "--input", "req.json"], home=tmp / "home")` returns a `PcboRun`
`(status, document, stderr)`: the exit status, stdout parsed as JSON (None when stdout is empty or
not JSON) and stderr. Every `PCBO_*` variable of the calling environment is dropped so a stray
setting (a failpoint, an endpoint) never leaks into a test; pass what a test needs in `env`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, NamedTuple

REPO_ROOT = Path(__file__).resolve().parent.parent


class PcboRun(NamedTuple):
    status: int
    document: Any
    stderr: str


_HOLD_A_DATASET_LOCK = """
import sys
from pcbo_dagster.engine.environment import Environment
from pcbo_dagster.engine.settings import Settings

env = Environment.open(Settings.resolve())
with env.dataset_lock(sys.argv[1], sys.argv[2], sys.argv[3]):
    print("holding", flush=True)
    sys.stdin.read()  # until the caller closes it
env.close()
"""


@contextmanager
def holding_dataset_lock(home: Path, dataset: str, version_label: str, run_id: str) -> Iterator[None]:
    """Another process on this host holds `dataset`/`version_label`'s lock file and write lease as run
    `run_id` (in `home`, as a run sharing its audit backup does) while the block runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_DATASET_LOCK, dataset, version_label, run_id],
        env=pcbo_env(home),
        cwd=home.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def pcbo_env(
    home: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a `pcbo` subprocess gets: ours without `PCBO_*`, plus PCBO_HOME and `env`."""
    result = {k: v for k, v in os.environ.items() if not k.startswith("PCBO_")}
    result["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        result["PCBO_HOME"] = os.fspath(home)
    result.update(env or {})
    return result


def run_cwd(
    home: str | os.PathLike[str] | None, cwd: str | os.PathLike[str] | None
) -> str | os.PathLike[str]:
    """The working directory of a `pcbo` run: `cwd`, else the home's parent (never the repository,
    where a default ./.pcbo would land), else this process's."""
    if cwd is not None:
        return cwd
    return Path(home).parent if home is not None else Path.cwd()


def stdout_document(stdout: str) -> Any:
    """A `pcbo` run's standard output parsed as JSON; None when it is empty or not JSON."""
    try:
        return json.loads(stdout) if stdout.strip() else None
    except ValueError:
        return None


def run_pcbo(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    stdin: bytes | None = None,
) -> PcboRun:
    """Run `python -m pcbo_dagster.cli.main *args` with PCBO_HOME=`home` and `env` added (`stdin`: its
    standard input, else this process's)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pcbo_dagster.cli.main", *(os.fspath(a) for a in args)],
        env=pcbo_env(home, env),
        cwd=run_cwd(home, cwd),
        capture_output=True,
        input=stdin,
        timeout=timeout,
        check=False,
    )
    stdout = proc.stdout.decode("utf-8", errors="replace")
    return PcboRun(proc.returncode, stdout_document(stdout), proc.stderr.decode("utf-8", errors="replace"))


@contextmanager
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


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A warning printed on (the current) `sys.stderr`, as a process without pytest prints it."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _warnings_as_a_fresh_process() -> None:
    """Inside `warnings.catch_warnings()`: the filters of `python` started without `-W` (Python 3.11's
    defaults) and warnings printed on stderr, not pytest's filters and its record of them."""
    warnings.resetwarnings()
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category, append=True)
    warnings.showwarning = _show_warning


def run_pcbo_in_process(
    args: Sequence[str | os.PathLike[str]],
    home: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> PcboRun:
    """`pcbo *args` as `run_pcbo(args, home, env, cwd)` runs it, in this process, for the steps of a
    test whose point is not the process boundary (it saves the 1-2 s a fresh interpreter spends
    importing). The same `PcboRun`, environment (`pcbo_env`) and working directory, both restored
    after. What the subprocess would show is captured at every level: Python's `sys.stdout` /
    `sys.stderr`, the file descriptors 1 and 2 (what a native library writes), and what the logging
    module would print through its last-resort handler (pytest's own handlers take the root logger's
    records otherwise). What outlives a command in a process and not in a fresh one is undone: the
    object store clients' loggers the CLI quietens (`quiet_store_client_logs`), and pyiceberg's
    process-wide cache of the manifests it read (keyed by path: a test that rewrote one would be judged
    from the cache). What pytest changes that a fresh process does not have is set aside while `main`
    runs: a warning is printed on stderr under the interpreter's default filters (pytest records it
    instead, and a check of stderr would not see it), an exception nothing can catch (a `__del__`'s)
    is printed there by Python's own hook (pytest's would make it a warning after the test), and
    `logging.disable` is off and no logger is disabled (as `logging.config` leaves the loggers it did
    not name, after an earlier test configured logging in this process). The status is
    `main`'s, that of the `SystemExit` argparse raises, or 1 with the traceback on stderr for an
    exception `main` lets through (as with `PCBO_DEBUG`). Never with
    `PCBO_FAILPOINT`: a failpoint ends its process (`os._exit`), so a crash stays a subprocess."""
    import logging
    import traceback

    from pyiceberg.manifest import clear_manifest_cache

    from pcbo_dagster.cli.main import main
    from pcbo_dagster.io.redaction import _OBJECT_STORE_CLIENTS

    assert "PCBO_FAILPOINT" not in (env or {}), "a failpoint ends its process: use run_pcbo"
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    store_loggers = [logging.getLogger(name.rstrip(".")) for name in _OBJECT_STORE_CLIENTS]
    saved_loggers = [(logger, list(logger.handlers), logger.propagate) for logger in store_loggers]
    out, err = io.StringIO(), io.StringIO()
    last_resort = logging.StreamHandler(err)  # what Python prints for a process without handlers
    last_resort.setLevel(logging.WARNING)
    root = logging.getLogger()
    os.environ.clear()
    os.environ.update(pcbo_env(home, env))
    os.chdir(run_cwd(home, cwd))
    root.addHandler(last_resort)
    clear_manifest_cache()
    saved_disable, saved_unraisable = logging.root.manager.disable, sys.unraisablehook
    logging.disable(logging.NOTSET)
    disabled = [
        logger
        for logger in (root, *logging.root.manager.loggerDict.values())
        if isinstance(logger, logging.Logger) and logger.disabled
    ]
    for logger in disabled:
        logger.disabled = False
    sys.unraisablehook = sys.__unraisablehook__
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with (
            _descriptor_captured(1) as native_out,
            _descriptor_captured(2) as native_err,
            redirect_stdout(out),
            redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            _warnings_as_a_fresh_process()
            try:
                status = main([os.fspath(a) for a in args])
            except SystemExit as exc:  # argparse refusing a flag, as `cli.main.run` maps it
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
            except Exception:  # an uncaught exception: its traceback, status 1
                traceback.print_exc()
                status = 1
    finally:
        clear_manifest_cache()
        logging.disable(saved_disable)
        for logger in disabled:
            logger.disabled = True
        sys.unraisablehook = saved_unraisable
        root.removeHandler(last_resort)
        for logger, handlers, propagate in saved_loggers:
            logger.handlers[:] = handlers
            logger.propagate = propagate
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    stdout = out.getvalue() + native_out.getvalue().decode("utf-8", errors="replace")
    stderr = err.getvalue() + native_err.getvalue().decode("utf-8", errors="replace")
    return PcboRun(status, stdout_document(stdout), stderr)


def load_generator() -> Any:
    """`benchmarks/generate_request.py` as a module (it is not part of the installed package)."""
    import importlib.util

    path = REPO_ROOT / "benchmarks" / "generate_request.py"
    spec = importlib.util.spec_from_file_location("pcbo_generate_request", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_request(path: Path, request: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, indent=1), encoding="utf-8")
    return path


# -- reading what a home holds, without going through pcbo ------------------------------------------


def lake_dir(home: Path) -> Path:
    return Path(home) / "lake"


def lake_files(home: Path) -> dict[str, bytes]:
    """Every file under `$home/lake` (relative posix path -> bytes), but the Iceberg table's own
    metadata under `_iceberg/` (random ids and timestamps by design: see the README's *Tables*)."""
    root = lake_dir(home)
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "_iceberg"
    }


def lake_snapshot(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under `$home/lake` -> (size, mtime_ns): any rewrite shows as a changed mtime."""
    root = lake_dir(home)
    result = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            result[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return result


def backup_file(home: Path, dataset: str = "events", version_label: str = "v1") -> Path:
    return Path(home) / "pas" / dataset / f"{version_label}.jsonl"


def backup_lines(home: Path, dataset: str = "events", version_label: str = "v1") -> list[bytes]:
    """The audit backup's lines (without their newlines)."""
    path = backup_file(home, dataset, version_label)
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the audit backup must end with a newline"
    return data.splitlines()


INTENT_EVENT_TYPES = ("partition_commit_intent", "partition_rollback_intent")


def backup_events(
    home: Path, dataset: str = "events", version_label: str = "v1", intents: bool = False
) -> list[dict[str, Any]]:
    """The chain's events from the local backup; without the intents (recorded before each commit
    batch and rollback) unless `intents`."""
    events = [json.loads(line) for line in backup_lines(home, dataset, version_label)]
    return events if intents else [e for e in events if e["event_type"] not in INTENT_EVENT_TYPES]


def tree_state(root: Path) -> dict[str, str]:
    """Every directory and file under `root`: a directory as `dir`, a SQLite database (`*.db`) as its
    rows (a lease taken and released rewrites pages, not rows), a database's shared-memory index
    (`*.db-shm`, which every reader of a database in WAL mode writes, a server's open one too) as
    `shm`, any other file (a `-wal` log too) as its SHA-256."""
    state: dict[str, str] = {}
    if not root.exists():
        return state
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_dir():
            state[name] = "dir"
        elif path.name.endswith(".db-shm"):
            state[name] = "shm"
        elif path.suffix == ".db":
            with tempfile.TemporaryDirectory() as scratch:  # read a copy: opening it could write it
                copy = Path(scratch) / "copy.db"
                shutil.copyfile(path, copy)
                connection = sqlite3.connect(copy)
                try:
                    state[name] = "\n".join(connection.iterdump())
                finally:
                    connection.close()
        else:
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state
