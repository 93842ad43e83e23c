"""Re-reading a committed partition from the lake, and what can be wrong with it.

One reading serves `pcbo verify`, `pcbo proof` and the Dagster reconciliation/compliance checks: the
commit point (`_manifest.json`, or a retained `_versions/vNNNNNN.json`), each file it names (present,
size, SHA-256, readable parquet, row count), then the content (ids unique and sorted, the record
count, the Merkle root recomputed from the rows). Findings are `{"kind", "where", "detail"}`; `where`
is the lake-relative path. A file that is missing, differs from its manifest's SHA-256 (tampered or
corrupted) or is not parquet is *unreadable*: its rows are not read, it is reported once as such, and
no count or root is compared over the rows that could be read (they would only repeat the finding
as a wrong number of rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pcbo_dagster.core import merkle
from pcbo_dagster.core.canonical import prefixed, sha256_hex
from pcbo_dagster.core.record_table import ID
from pcbo_dagster.lake import layout, manifests, parquet_files
from pcbo_dagster.lake.storage import LakeStorage


@dataclass
class PartitionReading:
    rel: str
    manifest: dict[str, Any] | None = None
    manifest_checksum: str | None = None
    tables: list[pa.Table] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    #: Files whose rows could not be trusted or read (missing, checksum mismatch, not parquet).
    unreadable: list[str] = field(default_factory=list)
    bytes_read: int = 0

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    def _find(self, kind: str, where: str, detail: str) -> None:
        self.findings.append({"kind": kind, "where": where, "detail": detail})


def read_commit_point(lake: LakeStorage, dataset: str, version_label: str, key: str) -> PartitionReading:
    """Only the partition's `_manifest.json` (no data files): `committed` is False when it has none."""
    return _read_manifest(lake, layout.manifest(dataset, version_label, key))


def _read_manifest(lake: LakeStorage, rel: str) -> PartitionReading:
    data = lake.read_if_exists(rel)
    reading = PartitionReading(rel)
    if data is None:
        return reading
    try:
        manifest = manifests.decode(data)
    except ValueError:
        reading._find("manifest_unreadable", rel, "not a pcbo manifest")
        return reading
    problem = manifests.files_problem(manifest)
    if problem is not None:
        reading._find("manifest_unreadable", rel, f"not a pcbo manifest: {problem}")
        return reading
    reading.manifest, reading.manifest_checksum = manifest, manifests.checksum(data)
    return reading


def read_partition(lake: LakeStorage, dataset: str, version_label: str, key: str) -> PartitionReading:
    """Re-read a partition's commit point and files; `committed` is False when it has none."""
    return _read_files(
        lake, read_commit_point(lake, dataset, version_label, key), dataset, version_label, key
    )


def read_version(
    lake: LakeStorage, dataset: str, version_label: str, key: str, version: int
) -> PartitionReading:
    """Re-read a retained version of a partition (`_versions/vNNNNNN.json` and its files);
    `committed` is False when the partition has no such version."""
    rel = layout.version_manifest(dataset, version_label, key, version)
    return _read_files(lake, _read_manifest(lake, rel), dataset, version_label, key)


def _read_files(
    lake: LakeStorage, reading: PartitionReading, dataset: str, version_label: str, key: str
) -> PartitionReading:
    """The files `reading`'s manifest names (each one of the partition's own data files, or a finding)."""
    if reading.manifest is None:
        return reading
    for entry in reading.manifest["files"]:
        try:
            where = layout.data_file_path(dataset, version_label, key, entry.get("path"))
        except (layout.OutsidePartition, AttributeError) as exc:
            where = str(entry.get("path")) if isinstance(entry, dict) else repr(entry)
            reading._find("path_outside_partition", reading.rel, str(exc))
            reading.unreadable.append(where)
            continue
        blob = lake.read_if_exists(where)
        if blob is None:
            reading._find("file_missing", where, f"unreadable: missing, though {reading.rel} names it")
            reading.unreadable.append(where)
            continue
        reading.bytes_read += len(blob)
        size = f"{len(blob)} bytes, manifest says {entry['byteSize']}"
        if prefixed(sha256_hex(blob)) != entry["checksum"]:
            # One finding a file: its size, when that differs too, is part of it.
            resized = f"; {size}" if len(blob) != entry["byteSize"] else ""
            reading._find(
                "file_checksum_mismatch",
                where,
                "unreadable: the file's SHA-256 differs from its manifest (tampered or corrupted"
                f"{resized}); its rows are not read",
            )
            reading.unreadable.append(where)
            continue
        if len(blob) != entry["byteSize"]:
            reading._find("file_size_mismatch", where, size)
        try:
            table = parquet_files.decode(blob)
        except (pa.ArrowException, OSError) as exc:
            reading._find("file_unreadable", where, f"unreadable: not readable as parquet: {exc}")
            reading.unreadable.append(where)
            continue
        if table.num_rows != entry["rowCount"]:
            reading._find(
                "row_count_mismatch", where, f"{table.num_rows} rows, manifest says {entry['rowCount']}"
            )
        reading.tables.append(table)
        reading.ids.extend(table[ID].to_pylist())
    _content_findings(reading)
    return reading


def _content_findings(reading: PartitionReading) -> None:
    manifest, ids, rel = reading.manifest, reading.ids, reading.rel
    assert manifest is not None
    if ids != sorted(set(ids)):
        reading._find("ids_not_sorted_unique", rel, "ids must be unique and sorted")
    if reading.unreadable:
        return  # the rows read are not the partition's: counting or hashing them says nothing more
    if len(ids) != manifest.get("recordCount"):
        reading._find(
            "record_count_mismatch", rel, f"{len(ids)} rows, manifest says {manifest.get('recordCount')}"
        )
    if merkle.root_hex(sorted(ids)) != manifest.get("merkleRoot"):
        reading._find(
            "merkle_root_mismatch", rel, "the root recomputed from the rows differs from the manifest"
        )
