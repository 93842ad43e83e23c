"""Rollout reports on disk: each one a JSON document and its markdown rendering, side by side.

Reports go under `$PCBO_HOME/reports/rollouts/<rollout>/` (the production home; `PCBO_REPORTS_DIR`
moves them), e.g. `backfill_summary.json` / `.md`, `soak_report.json` / `.md`,
and health reports under `$PCBO_HOME/reports/health/<dataset>/`. Each file is replaced
all-or-nothing. JSON is written with sorted keys, so a report whose content did not change is
byte-identical when written again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pcbo_dagster.core.json_documents import sorted_document
from pcbo_dagster.core.rollout_lifecycle import check_rollout_name
from pcbo_dagster.engine.settings import Settings
from pcbo_dagster.io.atomic_files import replace_file


def reports_dir(settings: Settings, environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ if environ is None else environ)
    return Path(environ.get("PCBO_REPORTS_DIR") or settings.home / "reports").expanduser().resolve()


def rollout_reports_dir(settings: Settings, rollout: str) -> Path:
    """`reports/rollouts/<rollout>/`; `InvalidInput` for a name that cannot name a rollout (a catalog
    row's `../..`: `check_rollout_name`)."""
    return reports_dir(settings) / "rollouts" / check_rollout_name(rollout)


def write_report(directory: Path, stem: str, document: dict[str, Any], markdown: str) -> dict[str, str]:
    """Write `<stem>.json` and `<stem>.md` into `directory`; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    replace_file(json_path, sorted_document(document))
    replace_file(md_path, markdown.encode("utf-8"))
    return {"json": str(json_path), "markdown": str(md_path)}


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table (pipes in cells escaped)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
