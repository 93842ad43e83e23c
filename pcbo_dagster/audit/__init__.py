"""Audit trail I/O: the local PAS backup, the chain writer and remote delivery (CONTRACT section 6)."""

from pcbo_dagster.audit.backup import AuditBackup, AuditBackupCorrupt
from pcbo_dagster.audit.delivery import DeliveryReport, HttpDelivery, read_cursor
from pcbo_dagster.audit.log import AuditLog, ChainDivergence, ChainHeadStore, ChainHeadTxn, ReconcileResult

__all__ = [
    "AuditBackup",
    "AuditBackupCorrupt",
    "AuditLog",
    "ChainDivergence",
    "ChainHeadStore",
    "ChainHeadTxn",
    "DeliveryReport",
    "HttpDelivery",
    "ReconcileResult",
    "read_cursor",
]
