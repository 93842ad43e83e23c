"""The test helpers that run pcbo (`cli_runner.run_pcbo_in_process`): what a test asserts of a run in
this process must hold of a real one, so what a real process prints on stderr reaches its `stderr`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.cli import main as cli_main
from pcbo_dagster_tests.cli_runner import run_pcbo_in_process


def _warning_during_the_command(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    original = cli_main.check_output_target

    def warning_then_original(*args: Any, **kwargs: Any) -> Any:
        warnings.warn(text, UserWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cli_main, "check_output_target", warning_then_original)


def test_a_warning_is_printed_on_stderr_as_a_real_process_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real process prints a warning on stderr (pytest records it instead): a check of stderr (no
    secret, one line) must see it, every run (no registry of warnings already shown)."""
    _warning_during_the_command(monkeypatch, "TOPSECRET in a warning")
    for _ in range(2):
        run = run_pcbo_in_process(["verify-proof", "--proof", tmp_path / "absent.json"], cwd=tmp_path)
        assert run.status == 2, run.stderr
        assert "UserWarning: TOPSECRET in a warning" in run.stderr, run.stderr


class _RaisesWhenCollected:
    def __del__(self) -> None:
        raise RuntimeError("TOPSECRET in an unraisable exception")


def test_an_unraisable_exception_is_printed_on_stderr_as_a_real_process_prints_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception raised where nothing can catch it (a `__del__`, a callback) is printed by a real
    process on stderr ("Exception ignored in ..."); pytest's hook would turn it into a warning of its
    own after the run, out of the run's stderr."""
    original = cli_main.check_output_target

    def unraisable_then_original(*args: Any, **kwargs: Any) -> Any:
        _RaisesWhenCollected()  # collected at once: its __del__ raises
        return original(*args, **kwargs)

    monkeypatch.setattr(cli_main, "check_output_target", unraisable_then_original)
    run = run_pcbo_in_process(["verify-proof", "--proof", tmp_path / "absent.json"], cwd=tmp_path)
    assert run.status == 2, run.stderr
    assert "Exception ignored in" in run.stderr and "TOPSECRET" in run.stderr, run.stderr


def test_a_logger_an_earlier_configuration_disabled_still_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`logging.config.dictConfig` (Dagster's, run in this process by an earlier test) disables the
    loggers that existed then; a fresh process has none disabled, so a warning logged there reaches
    stderr, and must reach the run's stderr here too (the logger disabled again after)."""
    import logging

    logger = logging.getLogger("pcbo_dagster.probe_of_the_runner")
    monkeypatch.setattr(logger, "disabled", True)
    original = cli_main.check_output_target

    def logged_then_original(*args: Any, **kwargs: Any) -> Any:
        logger.warning("TOPSECRET in a log line")
        return original(*args, **kwargs)

    monkeypatch.setattr(cli_main, "check_output_target", logged_then_original)
    run = run_pcbo_in_process(["verify-proof", "--proof", tmp_path / "absent.json"], cwd=tmp_path)
    assert run.status == 2, run.stderr
    assert "TOPSECRET in a log line" in run.stderr, run.stderr
    assert logger.disabled
