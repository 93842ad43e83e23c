"""The package works from an installed wheel, not only from an editable checkout.

The wheel is built (`pip wheel --no-deps`) from a copy of the sources, installed without its
dependencies into a fresh virtual environment (which sees this environment's installed dependencies
through a `.pth` line, so nothing is downloaded or reinstalled), and used from an empty directory:
`pcbo demo-data`, `pcbo validate-config` and loading the Dagster definitions find the example
datasets config inside the installed package and its demo sources under `$PCBO_HOME/demo_data`.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEEL_SOURCES = ("pyproject.toml", "README.md", "pcbo_dagster")


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """`pip wheel --no-deps` of a copy of the sources (an in-tree build would write build/ here)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in WHEEL_SOURCES:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(origin, source / name)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)]
    _run(build, tmp_path, env)
    (wheel,) = dist.glob("pcbo_dagster-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path, env: dict[str, str]) -> Path:
    """A new virtual environment holding the wheel; its dependencies are this environment's."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
        ).strip()
    )
    # A plain path line: this environment's packages become importable, but .pth files in it (such
    # as an editable install of pcbo_dagster) are not run, so only the wheel provides pcbo_dagster.
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    return venv


@pytest.mark.slow
def test_the_demo_runs_from_an_installed_wheel_in_an_empty_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCBO_", "DAGSTER_", "PYTHON"))}
    wheel = _build_wheel(tmp_path, env)
    venv = _fresh_venv(tmp_path, wheel, env)
    empty = tmp_path / "empty"
    empty.mkdir()
    env["DAGSTER_HOME"] = str(tmp_path / "dagster-home")
    (tmp_path / "dagster-home").mkdir()

    demo = json.loads(_run([str(venv / "bin" / "pcbo"), "demo-data"], empty, env))
    assert demo["directory"] == str(empty / ".pcbo" / "demo_data")
    assert [f["name"] for f in demo["files"]] == ["events.jsonl", "ledgers.jsonl", "sessions.jsonl"]

    checked = json.loads(_run([str(venv / "bin" / "pcbo"), "validate-config"], empty, env))
    config = Path(checked["config"])
    assert config.name == "datasets.yaml" and venv in config.parents  # the packaged copy
    assert checked["sourcesDir"] == str(empty / ".pcbo")
    assert {d["source"]["uri"] for d in checked["datasets"]} == {f["path"] for f in demo["files"]}
    assert all(d["source"]["present"] for d in checked["datasets"])
    assert not (config.parent / "demo_data").exists()  # nothing written inside the installed package

    loaded = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import pcbo_dagster, pcbo_dagster.dagster_defs.definitions as d; "
            "defs = d.defs(); print(pcbo_dagster.__file__); "
            "print(sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()))",
        ],
        empty,
        env,
    )
    module_file, assets = loaded.strip().splitlines()[-2:]
    assert venv in Path(module_file).parents, module_file  # the wheel's copy, not this checkout
    assert "events" in assets and "ledgers" in assets and "staging/sessions" in assets
