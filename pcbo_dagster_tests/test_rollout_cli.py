"""`pcbo rollout` from the command line, as an operator drives it: a throttled staging apply running
in one process, paused, resumed and cancelled from another; the gate refusing promotion; approvals
and their refusals. The throttled apply is a real `pcbo` process in real time (a throttle of 30
partitions a minute: 2 s a partition); the other commands run the same command line (`cli.main`) in
the test's own process, which is another process than the apply's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster_tests.approver_keys import APPROVERS_YAML, CY, MALLORY, key_file
from pcbo_dagster_tests.cli_runner import pcbo_env, tree_state
from pcbo_dagster_tests.cli_runner import run_pcbo_in_process as run_pcbo
from pcbo_dagster_tests.pcbo_fork_runner import run_pcbo_forked

KEYS = ["20240101T000000Z", "20240101T010000Z", "20240101T020000Z", "20240101T030000Z"]
CONFIG = f"""
version: 1
datasets:
  - name: sessions
    partitioning:
      {{kind: time_window, cron: hourly, start: "2024-01-01T00:00:00Z", end: "2024-01-01T04:00:00Z"}}
    source: {{uri: sessions.jsonl, format: jsonl}}
    policies: {{requireConsent: true, allowedJurisdictions: [US], onViolation: omit}}
    rollout:
      throttle: {{partitionsPerMinute: 30}}
      soak: {{windowMinutes: 30}}
      {APPROVERS_YAML}
"""
CONFIG_FLAG = ("--config", "datasets.yaml")


def _write_workdir(directory: Path) -> Path:
    """The source, the datasets config and the approvers' keys a rollout of `sessions` runs from."""
    records = [
        {
            "id": f"s-{h}-{n}",
            "occurredAt": f"2024-01-01T{h:02d}:{n * 10:02d}:00Z",
            "jurisdiction": "US",
            "consentGranted": n != 3,
        }
        for h in range(4)
        for n in range(5)
    ]
    (directory / "sessions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "datasets.yaml").write_text(CONFIG)
    key_file(directory, CY)
    key_file(directory, MALLORY)
    return directory


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return _write_workdir(tmp_path)


def pcbo(workdir: Path, *args: str) -> Any:
    return run_pcbo([*args], home=workdir / "home", cwd=workdir)


def start(workdir: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pcbo_dagster.cli.main",
            "rollout",
            "start",
            "--config",
            "datasets.yaml",
            "--dataset",
            "sessions",
            "--from",
            KEYS[0],
            "--to",
            KEYS[-1],
            "--name",
            name,
            "--by",
            "ana",
            "--poll-seconds",
            "0.1",
        ],
        cwd=workdir,
        env=pcbo_env(workdir / "home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def committed(workdir: Path) -> int:
    return len(list((workdir / "home" / "staging" / "lake").rglob("_manifest.json")))


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def status_of(workdir: Path, name: str) -> dict[str, Any]:
    result = pcbo(workdir, "rollout", "status", name, "--config", "datasets.yaml")
    assert result.status == 0, result.stderr
    return result.document


def test_pause_resume_then_gate_and_approvals(workdir: Path) -> None:
    proc = start(workdir, "r1")
    try:
        wait_for(lambda: committed(workdir) >= 1)
        paused = pcbo(workdir, "rollout", "pause", "r1", "--by", "bo", "--reason", "look at the first hour")
        assert paused.status == 0, paused.stderr
        assert paused.document["control"] == "pause"
        wait_for(lambda: status_of(workdir, "r1")["rollout"]["status"] == "paused")
        held = committed(workdir)
        time.sleep(2.5)  # longer than the throttle's gap: a paused apply writes nothing
        assert committed(workdir) == held < 4
        resumed = pcbo(workdir, "rollout", "resume", "r1", "--by", "bo")
        assert resumed.status == 0, resumed.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    document = json.loads(out)
    assert document["status"] == "soaking" and committed(workdir) == 4
    log = err.decode()
    assert "throttle (30 partitions/min): waiting" in log and "paused after" in log and "resumed" in log
    history = [h["kind"] for h in status_of(workdir, "r1")["history"]]
    for kind in ("created", "pause_requested", "paused", "resume_requested", "applying", "soaking"):
        assert kind in history
    assert history.index("pause_requested") < history.index("paused") < history.index("resume_requested")

    # The gate holds: soak not passed, no approval (exit 3, every reason in the document).
    blocked = pcbo(workdir, "rollout", "promote", "r1", "--by", "dee", "--config", "datasets.yaml")
    assert blocked.status == 3
    reasons = " ".join(blocked.document["reasons"])
    assert "soak" in reasons and "no signed approval yet" in reasons
    assert not list((workdir / "home" / "lake").rglob("_manifest.json"))

    # Approvals: the wrong decision hash and missing fields are refused (exit 2, field named).
    wrong = pcbo(
        workdir,
        "approve",
        "r1",
        "--key",
        "cy.key",
        "--reason",
        "ok",
        "--decision-hash",
        "sha256:" + "0" * 64,
        "--config",
        "datasets.yaml",
    )
    # Errors name the flag the user typed.
    assert wrong.status == 2 and "invalid input: --decision-hash: " in wrong.stderr
    blank = pcbo(workdir, "approve", "r1", "--key", "cy.key", "--reason", " ", "--config", "datasets.yaml")
    assert blank.status == 2 and "invalid input: --reason: " in blank.stderr
    unlisted = pcbo(workdir, "approve", "r1", "--key", "mallory.key", "--reason", "ok", *CONFIG_FLAG)
    assert unlisted.status == 2 and "not a listed approver" in unlisted.stderr
    assert "invalid input: --key: " in unlisted.stderr  # the key typed, not the statement signed with it
    unknown = pcbo(workdir, "reject", "nope", "--key", "cy.key", "--reason", "x", "--config", "datasets.yaml")
    assert unknown.status == 2 and "rollout" in unknown.stderr
    staged = status_of(workdir, "r1")["rollout"]["decision_hash"]
    approved = pcbo(
        workdir,
        "approve",
        "r1",
        "--key",
        "cy.key",
        "--reason",
        "numbers reviewed",
        "--decision-hash",
        staged,
        "--config",
        "datasets.yaml",
    )
    assert approved.status == 0, approved.stderr
    assert approved.document["decision"] == "approved" and approved.document["decisionHash"] == staged
    again = pcbo(workdir, "rollout", "promote", "r1", "--by", "dee", "--config", "datasets.yaml")
    assert again.status == 3 and not any("approval" in r for r in again.document["reasons"])


def test_cancel_then_roll_back(workdir: Path) -> None:
    proc = start(workdir, "r2")
    try:
        wait_for(lambda: committed(workdir) >= 1)
        cancelled = pcbo(workdir, "rollout", "cancel", "r2", "--by", "bo", "--reason", "wrong range")
        assert cancelled.status == 0, cancelled.stderr
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    document = json.loads(out)
    assert document["status"] == "cancelled"
    applied = len(document["execute"]["partitions"])
    assert 1 <= applied < 4 and committed(workdir) == applied
    summary = json.loads(
        (workdir / "home" / "reports" / "rollouts" / "r2" / "backfill_summary.json").read_text()
    )
    assert summary["status"] == "cancelled" and len(summary["notApplied"]) == 4 - applied
    # A cancelled rollout cannot be resumed or approved; it can be rolled back (idempotently).
    assert pcbo(workdir, "rollout", "resume", "r2", "--by", "bo").status == 2
    assert pcbo(workdir, "approve", "r2", "--key", "cy.key", "--reason", "x", *CONFIG_FLAG).status == 2
    for _ in range(2):
        rolled = pcbo(
            workdir,
            "rollout",
            "rollback",
            "r2",
            "--stage",
            "staging",
            "--by",
            "bo",
            "--reason",
            "cancelled",
            "--config",
            "datasets.yaml",
        )
        assert rolled.status == 0, rolled.stderr
    assert committed(workdir) == 0
    verified = run_pcbo(["verify"], home=workdir / "home" / "staging", cwd=workdir)
    assert verified.status == 0 and verified.document["findings"] == []
    # Rolled back is final, like cancelled: starting it again is refused and says so (it answered
    # exit 0 "already applied to staging (status rolled_back); nothing to do").
    window = ("--from", KEYS[0], "--to", KEYS[-1])
    again = pcbo(
        workdir,
        "rollout",
        "start",
        *CONFIG_FLAG,
        "--dataset",
        "sessions",
        *window,
        "--name",
        "r2",
        "--by",
        "ana",
    )
    assert again.status == 2 and again.document is None, again.stderr
    assert "invalid input: --name: rollout 'r2' was rolled back" in again.stderr
    assert "start a new one" in again.stderr and "already applied" not in again.stderr
    assert committed(workdir) == 0


def test_bad_range_is_refused_naming_the_field(workdir: Path) -> None:
    result = pcbo(
        workdir,
        "rollout",
        "start",
        "--config",
        "datasets.yaml",
        "--dataset",
        "sessions",
        "--from",
        "20240101T050000Z",
        "--to",
        KEYS[-1],
        "--by",
        "ana",
    )
    assert result.status == 2 and "invalid input: --from: " in result.stderr
    assert not (workdir / "home" / "staging" / "lake").exists() or committed(workdir) == 0
    backwards = pcbo(
        workdir,
        "rollout",
        "start",
        "--config",
        "datasets.yaml",
        "--dataset",
        "sessions",
        "--from",
        KEYS[2],
        "--to",
        KEYS[0],
        "--by",
        "ana",
    )
    assert backwards.status == 2 and "invalid input: --to: " in backwards.stderr
    no_rollout = pcbo(workdir, "rollout", "health", "--config", "datasets.yaml", "--dataset", "nope")
    assert no_rollout.status == 2 and "invalid input: --dataset: " in no_rollout.stderr


def test_an_unknown_rollout_is_refused_and_nothing_is_written(workdir: Path) -> None:
    home = workdir / "fresh-home"
    for args in (
        ["reject", "nope", "--key", "cy.key", "--reason", "x", "--config", "datasets.yaml"],
        ["rollout", "pause", "nope", "--by", "bo"],
        ["rollout", "soak", "nope", "--config", "datasets.yaml"],
        ["rollout", "status", "nope", "--config", "datasets.yaml"],
    ):
        result = run_pcbo(args, home=home, cwd=workdir)
        assert result.status == 2 and "rollout" in result.stderr, (args, result.stderr)
    listed = run_pcbo(["rollout", "list"], home=home, cwd=workdir)
    assert listed.status == 0 and listed.document == {"rollouts": []}
    assert not home.exists()


QUICK_SOAK_CONFIG = CONFIG.replace("throttle: {partitionsPerMinute: 30}", "throttle: {}").replace(
    "soak: {windowMinutes: 30}", "soak: {windowMinutes: 0.02}"
)


def test_promote_records_who_promoted_and_the_summary_names_real_commands(workdir: Path) -> None:
    """`rollout promote --by` like approve: who promoted is on the audit chain and in the rollout log;
    every command the backfill summary tells the operator to run is one `pcbo` accepts."""
    import shlex

    from pcbo_dagster.cli.main import build_parser

    (workdir / "datasets.yaml").write_text(QUICK_SOAK_CONFIG)
    config = ("--config", "datasets.yaml")
    window = ("--from", KEYS[0], "--to", KEYS[-1])
    started = pcbo(
        workdir, "rollout", "start", *config, "--dataset", "sessions", *window, "--name", "r3", "--by", "ana"
    )
    assert started.status == 0, started.stderr
    summary = (workdir / "home" / "reports" / "rollouts" / "r3" / "backfill_summary.md").read_text()
    commands = [c for c in summary.split("`") if c.startswith("pcbo ")]
    assert any(c.startswith("pcbo approve r3 ") for c in commands), summary
    assert any(c.startswith("pcbo rollout promote r3 ") for c in commands), summary
    for command in commands:  # argparse exits (SystemExit) on a command it does not know
        build_parser().parse_args(shlex.split(command)[1:])

    time.sleep(1.3)  # the soak window (0.02 minutes) ends; one evaluation after it passes the soak
    assert pcbo(workdir, "rollout", "soak", "r3", *config).status == 0
    approved = pcbo(workdir, "approve", "r3", "--key", "cy.key", "--reason", "numbers reviewed", *config)
    assert approved.status == 0, approved.stderr

    # no traceback: of a real process (forked), not of one in this process
    unnamed = run_pcbo_forked(["rollout", "promote", "r3", *config], home=workdir / "home", cwd=workdir)
    assert unnamed.status == 2 and "--by" in unnamed.stderr and "Traceback" not in unnamed.stderr
    blank = pcbo(workdir, "rollout", "promote", "r3", "--by", " ", *config)
    assert blank.status == 2 and "invalid input: --by: " in blank.stderr
    assert not list((workdir / "home" / "lake").rglob("_manifest.json"))

    promoted = pcbo(workdir, "rollout", "promote", "r3", "--by", "dee", *config)
    assert promoted.status == 0, promoted.stderr
    assert promoted.document["by"] == "dee" and promoted.document["status"] == "promoted"
    assert len(list((workdir / "home" / "lake").rglob("_manifest.json"))) == 4
    entry = next(h for h in status_of(workdir, "r3")["history"] if h["kind"] == "promoted")
    assert entry["actor"] == "dee" and entry["detail"]["promotedBy"] == "dee"
    assert entry["detail"]["approvedBy"] == CY.name
    chain = [json.loads(line) for line in (workdir / "home" / "pas" / "sessions" / "v1.jsonl").open()]
    event = chain[-1]
    assert event["event_type"] == "rollout_promoted" and event["by"] == "dee"
    assert event["approved_by"] == CY.name and event["complete"] is True
    assert event["chain"]["event_hash"] == promoted.document["auditEventHash"]
    assert event["partition_keys"] == KEYS and event["rollout"]["name"] == "r3"
    verified = run_pcbo(["verify"], home=workdir / "home", cwd=workdir)
    assert verified.status == 0 and verified.document["findings"] == []


def test_soak_counts_only_the_rollouts_it_evaluated(workdir: Path) -> None:
    """`pcbo rollout soak` of a rollout whose soak failed for good skips it saying why: `evaluated`
    is 0 and the rollout is counted as skipped (it said `evaluated: 1` with the skip in its result)."""
    (workdir / "datasets.yaml").write_text(QUICK_SOAK_CONFIG)
    config = ("--config", "datasets.yaml")
    window = ("--from", KEYS[0], "--to", KEYS[0])
    started = pcbo(
        workdir, "rollout", "start", *config, "--dataset", "sessions", *window, "--name", "r5", "--by", "ana"
    )
    assert started.status == 0, started.stderr
    (data_file,) = (workdir / "home" / "staging" / "lake" / "sessions" / "v1" / KEYS[0]).glob("*.parquet")
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data_file.write_bytes(bytes(data))

    failed = pcbo(workdir, "rollout", "soak", "r5", *config)
    assert failed.status == 0, failed.stderr
    assert failed.document["evaluated"] == 1 and failed.document["skipped"] == 0
    assert failed.document["results"][0]["evaluation"]["passed"] is False

    again = pcbo(workdir, "rollout", "soak", "r5", *config)
    assert again.status == 0, again.stderr
    assert again.document["evaluated"] == 0 and again.document["skipped"] == 1
    assert again.document["results"][0]["skipped"].startswith("the soak failed for good")


def start_quick(workdir: Path, name: str) -> Any:
    """Rollout `name` of the first partition staged with no throttle and a soak of about a second."""
    (workdir / "datasets.yaml").write_text(QUICK_SOAK_CONFIG)
    rng = ["--dataset", "sessions", "--from", KEYS[0], "--to", KEYS[0]]
    started = pcbo(workdir, "rollout", "start", *CONFIG_FLAG, *rng, "--name", name, "--by", "ana")
    assert started.status == 0, started.stderr
    return started


def test_control_of_a_rollout_not_applying_names_the_action(workdir: Path) -> None:
    """Pausing, resuming or cancelling a rollout whose staging apply is over is refused (exit 2 on
    `rollout`) in words: `cancelled`, not `canceld`."""
    start_quick(workdir, "r6")
    for action, participle in (("pause", "paused"), ("resume", "resumed"), ("cancel", "cancelled")):
        refused = pcbo(workdir, "rollout", action, "r6", "--by", "bo")
        assert refused.status == 2, refused.stderr
        assert refused.stderr.strip().endswith(
            f"rollout 'r6' is soaking: only a staging apply in progress can be {participle}"
        ), refused.stderr
    assert status_of(workdir, "r6")["rollout"]["control"] == "run"


def test_a_statement_with_another_reason_or_decision_hash_is_refused(workdir: Path) -> None:
    """`pcbo approve --statement FILE` records the statement's own reason and decision hash: a
    `--reason` or `--decision-hash` that says otherwise is refused naming the flag (exit 2, nothing
    recorded), never dropped silently; the same values are accepted."""
    from pcbo_dagster.core.instants import format_datetime
    from pcbo_dagster.core.signed_approvals import sign_approval

    started = start_quick(workdir, "r7")
    staged = started.document["execute"]["decisionHash"]
    now = format_datetime(datetime.now(UTC))
    note = sign_approval(CY, "r7", "approved", staged, "numbers reviewed", now)
    (workdir / "statement.txt").write_text(note.render())
    other = "sha256:" + "0" * 64
    for flags, field in (
        (("--reason", "something else"), "--reason"),
        (("--decision-hash", other), "--decision-hash"),
    ):
        refused = pcbo(workdir, "approve", "r7", "--statement", "statement.txt", *flags, *CONFIG_FLAG)
        assert refused.status == 2, refused.stderr
        assert f"invalid input: {field}: " in refused.stderr, refused.stderr
        assert status_of(workdir, "r7")["approvals"] == []
    same = pcbo(
        workdir,
        "approve",
        "r7",
        "--statement",
        "statement.txt",
        "--reason",
        "numbers reviewed",
        "--decision-hash",
        staged,
        *CONFIG_FLAG,
    )
    assert same.status == 0, same.stderr
    assert same.document["reason"] == "numbers reviewed" and same.document["by"] == CY.name


def test_a_statement_from_the_future_is_refused_in_plain_words(workdir: Path) -> None:
    """An approval dated more than the clock skew ahead is refused (exit 2 on `--statement`) saying
    so: "an approval", not "a approval"."""
    from pcbo_dagster.core.instants import format_datetime
    from pcbo_dagster.core.signed_approvals import sign_approval

    (workdir / "datasets.yaml").write_text(QUICK_SOAK_CONFIG)
    window = ("--from", KEYS[0], "--to", KEYS[0])
    started = pcbo(
        workdir,
        "rollout",
        "start",
        *CONFIG_FLAG,
        "--dataset",
        "sessions",
        *window,
        "--name",
        "r8",
        "--by",
        "ana",
    )
    assert started.status == 0, started.stderr
    ahead = format_datetime(datetime.now(UTC) + timedelta(hours=2))
    note = sign_approval(CY, "r8", "approved", started.document["execute"]["decisionHash"], "ok", ahead)
    (workdir / "statement.txt").write_text(note.render())
    refused = pcbo(workdir, "approve", "r8", "--statement", "statement.txt", *CONFIG_FLAG)
    assert refused.status == 2 and "invalid input: --statement: " in refused.stderr, refused.stderr
    assert "a approval" not in refused.stderr and "an approval counts from when" in refused.stderr


SOAKING_RANGE = ["--dataset", "sessions", "--from", KEYS[0], "--to", KEYS[1]]


@pytest.fixture(scope="module")
def soaking_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home where rollout r1 of the first two partitions (`SOAKING_RANGE`, started by ana with
    CONFIG) is staged and soaking, built once per module: a test copies it into its `workdir` (the
    lake is found from the home, not from the paths its catalog recorded)."""
    work = _write_workdir(tmp_path_factory.mktemp("soaking"))
    started = pcbo(work, "rollout", "start", *CONFIG_FLAG, *SOAKING_RANGE, "--name", "r1", "--by", "ana")
    assert started.status == 0, started.stderr
    assert status_of(work, "r1")["rollout"]["status"] == "soaking"
    return work / "home"


@pytest.mark.parametrize(
    "who", ["ops\n\x1b[31mroot", "ana\u202e", "bo\tx"], ids=["newline-escape", "bidi", "tab"]
)
def test_a_by_with_a_control_character_is_refused_before_anything_is_written(
    workdir: Path, soaking_home: Path, who: str
) -> None:
    """`--by` is recorded as given on the audit chain and in the catalog and shown in logs, the Dagster
    UI and alert receivers: a line break or a terminal escape in it forged a line of its own there
    (stderr escaped it; nothing else does). Each command taking it refuses it, exit 2 naming `--by`,
    nothing written: a new rollout's start, and the steps of one that is soaking."""
    home = workdir / "home"
    refused = pcbo(workdir, "rollout", "start", *CONFIG_FLAG, *SOAKING_RANGE, "--by", who)
    assert refused.status == 2 and "invalid input: --by: " in refused.stderr, refused.stderr
    assert "control character" in refused.stderr and not home.exists()
    shutil.copytree(soaking_home, home)  # r1 of the same range started by ana: soaking
    for args in (
        ["rollout", "pause", "r1"],
        ["rollout", "promote", "r1", *CONFIG_FLAG],
        ["rollout", "rollback", "r1", *CONFIG_FLAG, "--stage", "staging", "--reason", "undo"],
    ):
        before = tree_state(home)
        result = pcbo(workdir, *args, "--by", who)
        assert result.status == 2, (args, result.stderr)
        assert "invalid input: --by: " in result.stderr and "control character" in result.stderr, (
            result.stderr
        )
        assert tree_state(home) == before, args
    assert status_of(workdir, "r1")["rollout"]["status"] == "soaking"


def test_a_reason_with_a_control_character_is_refused_before_anything_is_written(
    workdir: Path, soaking_home: Path
) -> None:
    """Red-team finding: a rollback's `--reason` (and a rollout pause's) is recorded on the audit chain
    and in the catalog as given, as `--by` is: a line break, an escape or a direction override in it
    was recorded as typed. Refused, exit 2 naming it, nothing written; `pcbo rollback` alike."""
    home = workdir / "home"
    shutil.copytree(soaking_home, home)  # r1 of SOAKING_RANGE started by ana: soaking
    for args in (
        ["rollout", "pause", "r1", "--by", "ana", "--reason", "stop\x1b[2Jnow"],
        ["rollout", "rollback", "r1", *CONFIG_FLAG, "--stage", "staging", "--by", "ana", "--reason", "a\nb"],
        ["rollback", "--dataset", "sessions", "--run-id", "nope", "--reason", "undo\u202e"],
    ):
        before = tree_state(home)
        result = pcbo(workdir, *args)
        assert result.status == 2, (args, result.stderr)
        assert "reason: " in result.stderr and "control character" in result.stderr, result.stderr
        assert tree_state(home) == before, args
    assert status_of(workdir, "r1")["rollout"]["status"] == "soaking"


def test_an_approval_with_no_approver_listed_names_the_setting(workdir: Path) -> None:
    """A dataset whose rollout block lists no approver: `pcbo approve` said `invalid input: rollout:`,
    naming the rollout as if it were wrong; it names the setting to fill in, `rollout.approvers`."""
    (workdir / "datasets.yaml").write_text(
        QUICK_SOAK_CONFIG.replace(APPROVERS_YAML, "approvers: []").replace("{windowMinutes: 0.02}", "{}")
    )
    rng = ["--dataset", "sessions", "--from", KEYS[0], "--to", KEYS[0]]
    started = pcbo(workdir, "rollout", "start", *CONFIG_FLAG, *rng, "--name", "r1", "--by", "ana")
    assert started.status == 0, started.stderr
    before = tree_state(workdir / "home")
    refused = pcbo(workdir, "approve", "r1", "--key", "cy.key", "--reason", "ok", *CONFIG_FLAG)
    assert refused.status == 2, refused.stderr
    assert "invalid input: rollout.approvers: no approvers are listed" in refused.stderr, refused.stderr
    assert tree_state(workdir / "home") == before
