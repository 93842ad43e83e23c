"""Opens the adapters the engine writes to: lake, catalog and audit log, from `Settings`."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pcbo_dagster.audit.backup import AuditBackup
from pcbo_dagster.audit.delivery import HttpDelivery
from pcbo_dagster.audit.log import AuditLog
from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.lake.storage import LakeStorage


@dataclass
class Environment:
    settings: Settings
    lake: LakeStorage
    catalog: CatalogStore
    audit: AuditLog

    @classmethod
    def open(cls, settings: Settings) -> Environment:
        settings.home.mkdir(parents=True, exist_ok=True)
        catalog = CatalogStore(settings.catalog_url)
        catalog.migrate()
        backup = AuditBackup(settings.audit_dir)
        delivery = None
        if settings.audit_endpoint:
            delivery = HttpDelivery(
                settings.audit_endpoint,
                attempts=settings.audit_attempts,
                initial_wait=settings.audit_initial_wait,
            )
        return cls(settings, LakeStorage(settings.lake_url), catalog, AuditLog(backup, catalog, delivery))

    def close(self) -> None:
        self.catalog.close()

    @contextmanager
    def dataset_lock(self, dataset: str, version_label: str) -> Iterator[None]:
        """Serialises executes and rollbacks of one dataset version that share this audit backup."""
        directory = self.settings.audit_dir / dataset
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"{version_label}.run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
