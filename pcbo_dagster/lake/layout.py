"""Where a partition's files live in the lake.

```
<lake>/<dataset>/<versionLabel>/<partitionKey>/
    part-<sha256 prefix>.parquet      data files, content-addressed and immutable
    _versions/v000001.json            each version's manifest (written before the commit)
    _rollback/v000001.json            how to undo that version
    _manifest.json                    the commit point: the current version's manifest
```
Readers and `pcbo verify` consider only what `_manifest.json` names.
"""

from __future__ import annotations

MANIFEST = "_manifest.json"


def partition_dir(dataset: str, version_label: str, key: str) -> str:
    return f"{dataset}/{version_label}/{key}"


def data_file(dataset: str, version_label: str, key: str, checksum_hex: str) -> str:
    return f"{partition_dir(dataset, version_label, key)}/part-{checksum_hex[:32]}.parquet"


def manifest(dataset: str, version_label: str, key: str) -> str:
    return f"{partition_dir(dataset, version_label, key)}/{MANIFEST}"


def version_manifest(dataset: str, version_label: str, key: str, version: int) -> str:
    return f"{partition_dir(dataset, version_label, key)}/_versions/v{version:06d}.json"


def rollback_manifest(dataset: str, version_label: str, key: str, version: int) -> str:
    return f"{partition_dir(dataset, version_label, key)}/_rollback/v{version:06d}.json"


def split_manifest_path(rel: str) -> tuple[str, str, str]:
    """(dataset, versionLabel, key) of a `_manifest.json` path."""
    dataset, version_label, key, _ = rel.split("/")
    return dataset, version_label, key
