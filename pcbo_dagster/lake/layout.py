"""Where a partition's files live in the lake.

```
<lake>/<dataset>/<versionLabel>/<partitionKey>/
    part-<sha256 prefix>.parquet      data files, content-addressed and immutable
    _versions/v000001.json            each version's manifest (written before the commit)
    _rollback/v000001.json            how to undo that version
    _manifest.json                    the commit point: the current version's manifest
```
Readers and `pcbo verify` consider only what `_manifest.json` names.

Nothing read from a manifest, a rollback manifest or a request may reach outside its partition:
`data_file_path` accepts a path from a manifest only when it is exactly one of the partition's own
content-addressed data files, and `check_partition` refuses a dataset, version label or partition key
that is not a plain name (no `/`, no `..`).
"""

from __future__ import annotations

import re

from pcbo_dagster.core.errors import IntegrityError
from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key

MANIFEST = "_manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DATA_FILE = re.compile(r"part-[0-9a-f]{32}\.parquet")


class OutsidePartition(IntegrityError, ValueError):
    """A path or name that would reach outside its partition's directory (exit status 1: what the
    lake or a manifest says cannot be trusted)."""


def check_names(dataset: str, version_label: str) -> None:
    """`OutsidePartition` unless dataset and version label are plain names (no `/`, no `..`)."""
    for what, value in (("dataset", dataset), ("versionLabel", version_label)):
        if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
            raise OutsidePartition(f"{what} {value!r} is not a plain name")


def check_partition(dataset: str, version_label: str, key: str) -> None:
    """`OutsidePartition` unless dataset and version label are plain names and key a partition key."""
    check_names(dataset, version_label)
    try:
        validate_partition_key(key)
    except PartitionKeyError as exc:
        raise OutsidePartition(str(exc)) from None


def data_file_path(dataset: str, version_label: str, key: str, path: object) -> str:
    """`path` (read from a manifest) when it is one of the partition's own data files
    (`<dataset>/<versionLabel>/<key>/part-<32 hex>.parquet`); `OutsidePartition` otherwise."""
    check_partition(dataset, version_label, key)
    prefix = partition_dir(dataset, version_label, key) + "/"
    if (
        not isinstance(path, str)
        or not path.startswith(prefix)
        or not _DATA_FILE.fullmatch(path[len(prefix) :])
    ):
        raise OutsidePartition(f"{path!r} is not a data file of partition {prefix[:-1]}")
    return path


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


_VERSION_FILE = re.compile(r"(_versions|_rollback)/v([0-9]{6,})\.json")


def split_version_file(rel: str) -> tuple[str, str, int] | None:
    """(partition directory, `_versions` or `_rollback`, version) of a version or rollback manifest's
    path (`version_manifest`, `rollback_manifest`); None for any other path."""
    directory, _, rest = rel.rpartition("/")
    directory, _, kind = directory.rpartition("/")
    found = _VERSION_FILE.fullmatch(f"{kind}/{rest}")
    if found is None or not directory:
        return None
    return directory, found.group(1), int(found.group(2))


def partition_places(dataset: str, version_label: str, key: str) -> tuple[str, str, str]:
    """Where a run writes partition `key`: the directories of its version and rollback manifests (in
    the partition's directory, which holds its data files) and its commit point (read, then replaced)."""
    directory = partition_dir(dataset, version_label, key)
    return f"{directory}/_versions", f"{directory}/_rollback", f"{directory}/{MANIFEST}"


def checkpoint_dir(dataset: str, version_label: str) -> str:
    """Where the signed checkpoints of the dataset version's audit chain are written."""
    return f"{dataset}/{version_label}/_checkpoints"


def checkpoint_file(dataset: str, version_label: str, tree_size: int) -> str:
    """A signed checkpoint of the dataset version's audit chain (its transparency log) at `tree_size`."""
    return f"{checkpoint_dir(dataset, version_label)}/{tree_size:012d}.checkpoint"


def split_manifest_path(rel: str) -> tuple[str, str, str] | None:
    """(dataset, versionLabel, key) of a commit point's path, `<dataset>/<versionLabel>/<key>/_manifest.json`;
    None for a `_manifest.json` anywhere else, or under names no partition has (an object store lists
    keys such as `<key>/./_manifest.json` or `<versionLabel>/../_manifest.json` as they are): no commit
    point (`pcbo verify` reports it, `lake_path_unexpected`)."""
    parts = rel.split("/")
    if len(parts) != 4 or parts[3] != MANIFEST:
        return None
    try:
        check_partition(parts[0], parts[1], parts[2])
    except OutsidePartition:
        return None
    return parts[0], parts[1], parts[2]
