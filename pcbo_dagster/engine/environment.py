"""Opens the adapters the engine writes to: lake, catalog and audit log, from `Settings`."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pcbo_dagster.audit.delivery import HttpDelivery
from pcbo_dagster.audit.log import AuditLog
from pcbo_dagster.audit.object_store_backup import open_backup
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.core.signed_note import SigningKey, VerifierKey
from pcbo_dagster.engine.settings import Settings, check_multi_host
from pcbo_dagster.engine.transparency_log import signing_key_of, witnesses_of
from pcbo_dagster.io.env_vars import lease_wait_seconds, positive_number
from pcbo_dagster.io.redaction import scrub_text
from pcbo_dagster.lake.storage import LakeStorage

#: How long a lease lasts without renewal (`PCBO_LEASE_TTL_SECONDS`): a run whose host died is taken
#: over this long after its last renewal (at once when it died on this host: its pid is gone).
LEASE_TTL_SECONDS = 300.0


def lease_ttl_seconds() -> float:
    return positive_number(
        "PCBO_LEASE_TTL_SECONDS", os.environ.get("PCBO_LEASE_TTL_SECONDS"), LEASE_TTL_SECONDS
    )


class DatasetBusy(PcboError):
    """Another run holds the dataset version's write lease (exit status 1)."""


def _process_space() -> str | None:
    """Where this process's pid means something: the kernel's boot id and the pid namespace (two
    containers with one host name, or one host rebooted, are other spaces). None when it cannot be
    told (no /proc): then no holder is ever judged dead by its pid, only by its lease's expiry."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _holder(holder_text: str) -> dict[str, Any]:
    """A lease's holder as pcbo writes it (an empty one for any other text: a catalog row anyone who
    can write the catalog may have written)."""
    try:
        holder = json.loads(holder_text)
    except (ValueError, RecursionError):
        return {}
    return holder if isinstance(holder, dict) else {}


#: How much of a lease holder text pcbo did not write its busy message quotes.
_HOLDER_SHOWN = 200


def _shown(text: str) -> str:
    """A text from a lease row (anyone who can write the catalog may have written it) as a busy
    message quotes it: scrubbed of credentials (`scrub_text`), its first `_HOLDER_SHOWN` characters."""
    text = scrub_text(text)
    return repr(text[:_HOLDER_SHOWN]) + (" …" if len(text) > _HOLDER_SHOWN else "")


def _written_by_pcbo(holder: dict[str, Any]) -> bool:
    """A holder of the shape `DatasetLease` writes (its run id or null, pid, host, token)."""
    return (
        "run" in holder
        and isinstance(holder["run"], str | None)
        and type(holder.get("pid")) is int
        and isinstance(holder.get("host"), str)
        and isinstance(holder.get("token"), str)
    )


def _busy_message(dataset: str, version_label: str, current: dict[str, Any] | None, waited: float) -> str:
    """Why a run gives up on a dataset version: who holds it (the catalog's lease row `current`; None
    when the run holding the file lock has not taken its lease yet, or already gave it back)."""
    if current is None:
        who = "another run on this host (it holds the dataset version's lock file)"
    elif current.get("row_locked"):
        locked = current.get("locked") or "its lease row"
        who = f"a catalog session that holds {locked} locked (pg_locks names it)"
    else:
        holder = _holder(current["holder"])
        since = f"since {current['acquired_at']:%Y-%m-%dT%H:%M:%SZ}"
        if not _written_by_pcbo(holder):
            who = f"a lease holder that is not one pcbo wrote ({_shown(str(current['holder']))}) {since}"
        else:
            run = holder["run"]
            run = f"run {_shown(run)}" if run is not None else "a pcbo command without a run"
            who = f"{run} (pid {holder['pid']} on {_shown(holder['host'])}) {since}"
    return (
        f"{dataset}/{version_label} is being written by {who}; waited {waited:g} s (PCBO_LEASE_WAIT_SECONDS)"
    )


def _pause_before(deadline: float) -> None:
    """The pause between two tries at what another run holds (its lock file, its lease): half a
    second, less near `deadline` (a `time.monotonic()` instant), never under 50 ms."""
    time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))


def _holder_is_dead(holder_text: str) -> bool:
    """A lease held by a process that no longer exists, in this very process space (same host name,
    boot and pid namespace: `_process_space`), is stale (a crashed run). A holder elsewhere, or one
    that does not say where, is waited for until its lease expires."""
    holder = _holder(holder_text)
    space = _process_space()
    if (
        holder.get("host") != socket.gethostname()
        or space is None
        or holder.get("space") != space
        or not isinstance(holder.get("pid"), int)
    ):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class DatasetLease:
    """The catalog's write lease on a dataset version, held for a run.

    While held, a heartbeat thread renews it every third of its time to live (so a long commit batch
    on a slow store never lets it lapse); the run also renews it between commit batches (`renew`),
    which raises `DatasetBusy` once the lease was lost (taken over after a missed renewal, even given
    back since): the run then stops before its next commit batch instead of writing beside the new
    holder."""

    def __init__(self, catalog: CatalogStore, dataset: str, version_label: str, run_id: str | None) -> None:
        self.catalog, self.dataset, self.version_label = catalog, dataset, version_label
        self.holder = json.dumps(
            {
                "run": run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "space": _process_space(),
                "token": uuid.uuid4().hex,
            },
            sort_keys=True,
        )
        self.ttl = lease_ttl_seconds()
        self.lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, wait_seconds: float, waited: float | None = None) -> None:
        """Take the lease, waiting up to `wait_seconds` for its holder; `waited`: the whole wait to
        report (the file lock's included) when it was longer."""
        deadline = time.monotonic() + wait_seconds
        while True:
            current = self.catalog.try_acquire_lease(
                self.dataset,
                self.version_label,
                self.holder,
                self.ttl,
                _holder_is_dead,
                lock_wait_seconds=max(0.0, deadline - time.monotonic()),
            )
            if current is None:
                self._start_heartbeat()
                return
            if time.monotonic() >= deadline:
                raise DatasetBusy(
                    _busy_message(self.dataset, self.version_label, current, waited or wait_seconds)
                )
            _pause_before(deadline)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    if not self.catalog.renew_lease(self.dataset, self.version_label, self.holder, self.ttl):
                        self.lost = True
                        return
                except Exception:  # noqa: BLE001 - a catalog hiccup: the next beat (or `renew`) tries again
                    continue

        self._heartbeat = threading.Thread(target=beat, name="pcbo-lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def renew(self) -> None:
        """Still this run's lease, extended; else `DatasetBusy`. A lease another took over and gave back
        meanwhile (its row gone) is lost too: renewing never takes it again, since that holder (a run
        that crashed after staging, a `pcbo gc` removing what it judged a crash's leftovers) may have
        changed the lake without a word on the chain."""
        if self.lost or not self.catalog.renew_lease(self.dataset, self.version_label, self.holder, self.ttl):
            self.lost = True
            raise DatasetBusy(f"{self.dataset}/{self.version_label}: the write lease was taken over")

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self.catalog.release_lease(self.dataset, self.version_label, self.holder, self.ttl)


@dataclass
class Environment:
    settings: Settings
    lake: LakeStorage
    catalog: CatalogStore
    audit: AuditLog
    #: The operator's key: checkpoints and evidence packages are signed with it (None: unsigned).
    signing_key: SigningKey | None = None
    #: Witnesses asked to cosign each checkpoint (`witness.client.Witness`).
    witnesses: list = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, create: bool = True, actor: str | None = None) -> Environment:
        """Open the lake, catalog and audit log; `create=False` (commands that only look at or undo
        what is there) refuses, with nothing created, an embedded catalog that does not exist yet. A
        signing key or witness list that is not valid, or witnesses without a signing key, are refused
        first (nothing created). `actor`: who
        the writes are made for (the HTTP API's token subject), named in every audit event appended
        through this environment. A configuration that cannot hold with runs on several hosts is
        refused first (`settings.check_multi_host`)."""
        check_multi_host(settings)
        signing_key = signing_key_of(settings)
        witnesses = witnesses_of(settings.witnesses, settings.witnesses_field, signing_key)
        if witnesses and signing_key is None:
            # (a run would sign no checkpoint, so ask no witness, and say so nowhere)
            raise InvalidInput(
                settings.witnesses_field,
                "witnesses cosign the checkpoints a signing key signs: give --signing-key or "
                "PCBO_SIGNING_KEY too, or no witness",
            )
        catalog = CatalogStore(settings.catalog_url)
        if not create and catalog.is_missing_sqlite_file():
            raise InvalidInput(
                settings.catalog_field,
                f"nothing here: no pcbo catalog at {catalog.url} (run an execute first, or say where it is)",
            )
        settings.home.mkdir(parents=True, exist_ok=True)
        catalog.migrate()
        backup = open_backup(settings.audit_location, settings.audit_dir)
        delivery = None
        if settings.audit_endpoint:
            delivery = HttpDelivery(
                settings.audit_endpoint,
                attempts=settings.audit_attempts,
                initial_wait=settings.audit_initial_wait,
            )
        return cls(
            settings,
            LakeStorage(settings.lake_url),
            catalog,
            AuditLog(backup, catalog, delivery, actor=actor, signing_key=signing_key),
            signing_key,
            witnesses,
        )

    @property
    def operator_verifier(self) -> VerifierKey | None:
        """The verifier key of the operator's key: with one, pcbo acts only on the events of a chain
        that key signed (`core/operator_signatures.py`); None (no key): nothing is signed or checked."""
        return None if self.signing_key is None else self.signing_key.verifier()

    def close(self) -> None:
        self.catalog.close()

    @contextmanager
    def dataset_lock(
        self, dataset: str, version_label: str, run_id: str | None = None, *, create: bool = True
    ) -> Iterator[DatasetLease]:
        """Only one run writes a dataset version at a time: a file lock for the runs sharing this audit
        backup, then the catalog's lease for runs anywhere (other hosts sharing a PostgreSQL catalog).
        Waits up to `PCBO_LEASE_WAIT_SECONDS` (default 600) in all, for the file lock (a run on this
        host) and then another run's lease, then raises `DatasetBusy` naming the holder. `create=False`
        (a dry run, which must create nothing) takes the file lock only where its file exists: a run
        that creates it meanwhile is still kept out by the lease."""
        wait_seconds = lease_wait_seconds()
        deadline = time.monotonic() + wait_seconds
        directory = self.settings.audit_dir / dataset
        # `@` is in no version label: no chain's own lock file (`<label>.lock`) can be this one
        path = directory / f"{version_label}@run.lock"
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        if not create and not path.exists():
            with self._lease(dataset, version_label, run_id, wait_seconds, wait_seconds) as lease:
                yield lease
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Waited for as the lease is, never longer: a run on this host holds this lock for as long
            # as it writes, and the second run's PCBO_LEASE_WAIT_SECONDS bounds its whole wait.
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        current = next(
                            (
                                row
                                for row in self.catalog.leases()
                                if (row["dataset"], row["version_label"]) == (dataset, version_label)
                            ),
                            None,
                        )
                        raise DatasetBusy(
                            _busy_message(dataset, version_label, current, wait_seconds)
                        ) from None
                    _pause_before(deadline)
            try:
                with self._lease(
                    dataset, version_label, run_id, max(0.0, deadline - time.monotonic()), wait_seconds
                ) as lease:
                    yield lease
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextmanager
    def _lease(
        self, dataset: str, version_label: str, run_id: str | None, wait_seconds: float, waited: float
    ) -> Iterator[DatasetLease]:
        lease = DatasetLease(self.catalog, dataset, version_label, run_id)
        lease.acquire(wait_seconds, waited)
        try:
            yield lease
        finally:
            lease.release()
