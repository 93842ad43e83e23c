"""`pcbo execute --dagster URL` (`dagster_defs/remote.py`) given a URL it refuses: exit 2 naming the
flag, the URL shown redacted (no password, no query), nothing submitted. No webserver is needed:
the URL is refused before anything is reached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("dagster_graphql")

from pcbo_dagster.cli import main as cli  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "url",
    [
        "ftp://admin:s3cretPW@127.0.0.1:3000",  # not http(s)
        "http://admin:s3cretPW@127.0.0.1:99999",  # an invalid port
        "https://tok-s3cretPW@dagster.example:-1/?key=s3cretPW",
        "http://admin:s3cretPW@127.0.0.1:3000/prefix",  # credentials the client would silently drop
        "http://127.0.0.1:99999/?token=s3cretPW",
    ],
)
def test_a_refused_dagster_url_is_named_without_its_credentials(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "request.json"
    shutil.copy(REPO_ROOT / "examples" / "demo_request.json", request)
    status = cli.main(["execute", "--dagster", url, "--input", str(request)])
    captured = capsys.readouterr()
    assert status == 2, captured
    assert "--dagster" in captured.err
    assert "s3cretPW" not in captured.err + captured.out
    assert "127.0.0.1" in captured.err or "dagster.example" in captured.err  # still says which URL
