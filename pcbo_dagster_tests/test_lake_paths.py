"""A local lake's writes and reads never go through a symbolic link planted anywhere below its root
(`LakeStorage._no_link`: each name looked at without following it), and the directories a write needs
are made as `os.makedirs` would, each new one noted for the next sync (`_make_dirs`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.lake.layout import OutsidePartition, partition_places
from pcbo_dagster.lake.storage import LakeStorage, _make_dirs

REL = "ds/v1/20240101T000000Z/_versions/v000001.json"
LEVELS = ["ds", "ds/v1", "ds/v1/20240101T000000Z", "ds/v1/20240101T000000Z/_versions"]


def _writes(lake: LakeStorage, rel: str):
    return {
        "create": lambda: lake.create(rel, b"new"),
        "write": lambda: lake.write(rel, b"new"),
        "write_atomic": lambda: lake.write_atomic(rel, b"new"),
        "swap": lambda: lake.swap(rel, b"new", None),
    }


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["out_of_the_lake", "into_the_lake", "dangling", "to_itself"])
@pytest.mark.parametrize("op", ["create", "write", "write_atomic", "swap"])
def test_a_link_at_any_level_below_the_root_is_refused(
    tmp_path: Path, level: str, kind: str, op: str
) -> None:
    lake_dir = tmp_path / "lake"
    lake = LakeStorage(lake_dir)
    lake.create("other/v1/k/_versions/keep.json", b"kept")  # another partition, inside the lake
    outside = tmp_path / "outside"
    (outside / "v1/20240101T000000Z/_versions").mkdir(parents=True)
    planted = lake_dir / level
    planted.parent.mkdir(parents=True, exist_ok=True)
    target = {
        "out_of_the_lake": str(outside / level.removeprefix("ds").lstrip("/")),
        "into_the_lake": str(lake_dir / "other/v1/k/_versions"),
        "dangling": str(tmp_path / "nowhere"),
        "to_itself": planted.name,  # a loop: resolving it never ends
    }[kind]
    os.symlink(target, planted)
    before_lake, before_outside = _snapshot(lake_dir), _snapshot(outside)
    with pytest.raises(OutsidePartition):
        _writes(lake, REL)[op]()
    assert not lake.inside(REL) and not lake.inside(level + "/x")
    with pytest.raises(OutsidePartition):
        lake.read_if_exists(REL)
    assert _snapshot(lake_dir) == before_lake and _snapshot(outside) == before_outside
    assert not (tmp_path / "nowhere").exists()


def test_a_link_at_the_name_itself_is_replaced_never_written_through(tmp_path: Path) -> None:
    lake_dir = tmp_path / "lake"
    lake = LakeStorage(lake_dir)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the lake's")
    (lake_dir / "ds/v1/k").mkdir(parents=True)
    os.symlink(victim, lake_dir / "ds/v1/k/part.parquet")
    assert not lake.inside("ds/v1/k/part.parquet") and lake.inside("ds/v1/k")
    with pytest.raises(OutsidePartition):
        lake.read("ds/v1/k/part.parquet")
    assert lake.create("ds/v1/k/part.parquet", b"data") is None
    assert victim.read_bytes() == b"not the lake's"
    assert not (lake_dir / "ds/v1/k/part.parquet").is_symlink()
    assert lake.read("ds/v1/k/part.parquet") == b"data"


def test_plain_names_below_the_root_are_inside_whether_they_exist_or_not(tmp_path: Path) -> None:
    lake = LakeStorage(tmp_path / "lake")
    assert lake.inside("ds/v1/k/part.parquet")  # nothing exists yet
    lake.create("ds/v1/k/part.parquet", b"data")
    assert lake.inside("ds/v1/k/part.parquet") and lake.inside("ds/v1/k/missing/deeper")
    assert lake.inside("ds/v1/k/part.parquet/below-a-file")  # not a directory: nothing to follow
    for bad in ("", "/ds", "ds/../x", "ds/./x", "ds//x", "ds\\x"):
        assert not lake.inside(bad)


def test_refuse_links_looks_at_each_name_once_and_refuses_what_a_write_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check a command makes before it writes anything (`LakeStorage.refuse_links`): each name
    below the root looked at once however many places share it, nothing below a missing one; a link at
    or on the way to a place refuses it with the message a write there gives, nothing written."""
    lake_dir = tmp_path / "lake"
    lake = LakeStorage(lake_dir)
    keys = [f"2024010{d}T000000Z" for d in range(10)]
    for key in keys[:4]:  # four partitions with a version manifest, six not yet written
        lake.create(f"ds/v1/{key}/_versions/v000001.json", b"m")
    places = [place for key in keys for place in partition_places("ds", "v1", key)]
    looked: list[str] = []
    lstat = os.lstat

    def looking(path: str, *args: Any, **kwargs: Any) -> os.stat_result:
        looked.append(path)
        return lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", looking)
    lake.refuse_links(places)
    monkeypatch.undo()
    assert sorted(looked) == sorted(set(looked)), "a name was looked at twice"
    # ds, ds/v1; each written partition, its _versions, _rollback and _manifest.json; each other partition
    assert len(looked) == 2 + 4 * 4 + 6
    os.symlink(tmp_path / "elsewhere", lake_dir / "ds/v1" / keys[2] / "_rollback")
    before = _snapshot(lake_dir)
    with pytest.raises(OutsidePartition) as refused:
        lake.refuse_links(places)
    with pytest.raises(OutsidePartition) as written:
        lake.create(f"ds/v1/{keys[2]}/_rollback/v000001.json", b"r")
    assert (
        str(refused.value) == f"'ds/v1/{keys[2]}/_rollback' leads outside the lake or through a symbolic link"
    )
    assert str(written.value).endswith("leads outside the lake or through a symbolic link")
    assert _snapshot(lake_dir) == before and not (tmp_path / "elsewhere").exists()
    os.symlink(
        lake_dir / "ds/v1" / keys[0] / "_manifest.json", lake_dir / "ds/v1" / keys[1] / "_manifest.json"
    )
    with pytest.raises(OutsidePartition, match=f"'ds/v1/{keys[1]}/_manifest.json' leads outside"):
        lake.refuse_links(places)  # a name read before it is replaced: refused as that read is
    with pytest.raises(OutsidePartition):
        lake.read_if_exists(f"ds/v1/{keys[1]}/_manifest.json")


@pytest.mark.parametrize(
    "existing,wanted",
    [
        ([], "a"),
        ([], "a/b/c"),
        (["a"], "a/b/c"),
        (["a/b"], "a/b/c"),
        (["a/b/c"], "a/b/c"),
        (["a/b"], "a/b"),
        (["a", "x/y"], "a/b/c/d/e"),
    ],
)
def test_make_dirs_makes_what_makedirs_makes_and_names_each_new_one(
    tmp_path: Path, existing: list[str], wanted: str
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for base in (ours, theirs):
        base.mkdir()
        for d in existing:
            (base / d).mkdir(parents=True)
    missing = [str(ours / wanted)]
    while not Path(missing[-1]).parent.exists():
        missing.append(str(Path(missing[-1]).parent))
    missing = [m for m in missing if not Path(m).exists()]
    made = _make_dirs(str(ours / wanted))
    os.makedirs(theirs / wanted, exist_ok=True)
    assert made == list(reversed(missing))  # outermost first, only those that were missing
    assert sorted(p.relative_to(ours) for p in ours.rglob("*")) == sorted(
        p.relative_to(theirs) for p in theirs.rglob("*")
    )
    assert _make_dirs(str(ours / wanted)) == []  # all there now: nothing made


def test_make_dirs_refuses_a_file_on_the_way_as_makedirs_does(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/file").write_bytes(b"x")
    for wanted in ("a/file", "a/file/b"):
        with pytest.raises(OSError) as ours:
            _make_dirs(str(tmp_path / wanted))
        with pytest.raises(OSError) as theirs:
            os.makedirs(tmp_path / wanted, exist_ok=True)
        assert type(ours.value) is type(theirs.value) and ours.value.errno == theirs.value.errno
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["file"]


def test_new_directories_are_entries_synced_with_their_parents(tmp_path: Path, monkeypatch) -> None:
    from pcbo_dagster.lake import storage

    synced: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        storage, "_fsync_path", lambda path, directory=False: synced.append((path, directory))
    )
    lake = LakeStorage(tmp_path / "lake")
    root = str((tmp_path / "lake").resolve())
    lake.create("ds/v1/k/_versions/v1.json", b"m")
    lake.sync()
    dirs = {p for p, d in synced if d}
    # each directory made holds the new file or a new directory: up to the lake's parent (the lake is new)
    assert {f"{root}/ds/v1/k/_versions", f"{root}/ds/v1/k", f"{root}/ds/v1", f"{root}/ds", root} <= dirs
    assert str(Path(root).parent) in dirs
    synced.clear()
    lake.create("ds/v1/k/_rollback/v1.json", b"r")  # one new directory in an existing one
    lake.sync()
    assert {p for p, d in synced if d} == {f"{root}/ds/v1/k/_rollback", f"{root}/ds/v1/k"}


def test_every_file_a_run_writes_has_the_mode_the_umask_gives(tmp_path: Path) -> None:
    """Walk finding: commit points (`_manifest.json`, written through a temporary file of mode 0600)
    and the `--output` document were readable by their owner alone, while the data files and version
    manifests beside them were 0644: another user allowed to read the lake could read its files but
    not which of them are committed. Every file is now created as `open(path, "w")` would create it."""
    import shutil
    import stat

    from pcbo_dagster_tests.cli_runner import run_pcbo
    from pcbo_dagster_tests.http_server import DEMO_REQUEST

    shutil.copyfile(DEMO_REQUEST, tmp_path / "req.json")
    old = os.umask(0o022)  # inherited by the command
    try:
        run = run_pcbo(["execute", "--input", "req.json", "--output", "out.json"], home=tmp_path / "home")
    finally:
        os.umask(old)
    assert run.status == 0, run.stderr
    lake = tmp_path / "home" / "lake"
    modes = {
        path.relative_to(lake).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in lake.rglob("*")
        if path.is_file() and "_iceberg" not in path.parts
    }
    assert any(rel.endswith("/_manifest.json") for rel in modes), modes
    assert {rel: mode for rel, mode in modes.items() if mode != 0o644} == {}
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
