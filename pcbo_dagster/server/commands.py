"""Maintenance commands (`POST /commands/run`): `{commandId, action, target, params}`.

A command goes `queued` → `running` → `success` | `error` | `timeout`; each phase is appended to the
append-only `command_audit` table (who — the token's subject —, the action, target, parameters, the
outcome, the state before and after, the command's log lines) and published on the event stream as
a `command.status` event. `commandId` makes the call idempotent: a known id answers the command's
current state and runs nothing again.

| action             | target               | params                                        | scope   |
|--------------------|----------------------|-----------------------------------------------|---------|
| `retry-partitions` | a configured dataset | `partitions` (one contiguous range), `runId`? | execute |
| `rollback`         | a dataset            | `versionLabel`?, `runId` or `partition`       | execute |
|                    |                      | (+ `version`?), `reason`?                     |         |
| `pause-rollout`    | a rollout            | `reason`?                                     | approve |
| `resume-rollout`   | a rollout            | `reason`?                                     | approve |
| `cancel-rollout`   | a rollout            | `reason`?                                     | approve |
| `verify`           | `all`                | `repair`? (true needs admin)                  | read    |
| `gc`               | `all`                | `dryRun`?                                     | admin   |

Every action is the engine's (or the rollout operations'), the same functions the CLI calls, run in a
worker thread under the token subject as actor. `params.timeoutSeconds` (default
`PCBO_SERVER_COMMAND_TIMEOUT`) bounds how long the command may run: past it the command is recorded
`timeout` (the engine work already started is not torn down mid-write: it finishes in the background,
and its result is logged, not recorded as a second outcome).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request

from pcbo_dagster.catalog import CatalogStore
from pcbo_dagster.core.errors import InvalidInput, PcboError
from pcbo_dagster.core.instants import format_datetime
from pcbo_dagster.core.recorded_text import check_reason
from pcbo_dagster.core.request_model import NAME_PATTERN
from pcbo_dagster.server.auth import Principal, authenticated, check_dataset
from pcbo_dagster.server.broker import EVERY_DATASET, EventBroker
from pcbo_dagster.server.config import ServerConfig
from pcbo_dagster.server.errors import ApiError, invalid

log = logging.getLogger("pcbo.server.commands")

#: action -> the scope it needs.
ACTIONS = {
    "retry-partitions": "execute",
    "rollback": "execute",
    "pause-rollout": "approve",
    "resume-rollout": "approve",
    "cancel-rollout": "approve",
    "verify": "read",
    "gc": "admin",
}
FINAL_PHASES = ("success", "error", "timeout")
#: Commands one token subject may have in flight at once (queued, running, or past their timeout with
#: their engine work still going): one more is 429 `too_many_commands`.
COMMANDS_IN_FLIGHT_PER_SUBJECT = 4


def command_principal(request: Request) -> Principal:
    """A FastAPI dependency: the request's principal, which must hold a scope some command needs (a
    plan-only token learns nothing of the commands, not even which ids exist)."""
    principal = authenticated(request)
    if not any(principal.has(scope) for scope in set(ACTIONS.values())):
        raise ApiError(403, "forbidden", "this token lacks the scope of every command")
    return principal


def check_command_scope(principal: Principal, state: dict[str, Any]) -> None:
    """403 unless the token may read the recorded command `state`: `read`, or its action's scope."""
    scope = ACTIONS.get(state["action"], "admin")
    if not (principal.has("read") or principal.has(scope)):
        either = "'read'" if scope == "read" else f"'read' or {scope!r}"
        raise ApiError(403, "forbidden", f"this token lacks the {either} scope")


#: Parameters each action takes (anything else is invalid input: a typo must not be ignored).
PARAMS = {
    "retry-partitions": {"partitions", "runId", "timeoutSeconds"},
    "rollback": {"versionLabel", "runId", "partition", "version", "reason", "timeoutSeconds"},
    "pause-rollout": {"reason", "timeoutSeconds"},
    "resume-rollout": {"reason", "timeoutSeconds"},
    "cancel-rollout": {"reason", "timeoutSeconds"},
    "verify": {"repair", "trustedLedgers", "timeoutSeconds"},
    "gc": {"dryRun", "timeoutSeconds"},
}


class VerifyFindings(PcboError):
    """verify ran and found problems: the command ends in `error`, like `pcbo verify`'s exit 1."""

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        self.document = document
        super().__init__(message)


@dataclass
class Command:
    command_id: str
    action: str
    target: str
    params: dict[str, Any]
    actor: str
    dataset: str | None
    logs: list[str] = field(default_factory=list)

    def record(self, phase: str, **values: Any) -> dict[str, Any]:
        return dict(
            command_id=self.command_id,
            phase=phase,
            actor=self.actor,
            action=self.action,
            target=self.target,
            dataset=self.dataset,
            params=self.params,
            logs=list(self.logs),
            **values,
        )


def command_state(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The API document of a command from its audit rows (oldest first)."""
    last = rows[-1]
    return {
        "commandId": last["command_id"],
        "action": last["action"],
        "target": last["target"],
        "params": last["params"],
        "actor": last["actor"],
        "phase": last["phase"],
        "phases": [{"phase": r["phase"], "at": format_datetime(r["recorded_at"])} for r in rows],
        "outcome": last["outcome"],
        "beforeState": next((r["before_state"] for r in rows if r["before_state"] is not None), None),
        "afterState": last["after_state"],
        "logs": last["logs"],
    }


def _text(params: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = params.get(name, default)
    if value is not None and not isinstance(value, str):
        raise invalid(f"params.{name}", "must be a string")
    return value


def _flag(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise invalid(f"params.{name}", "must be true or false")
    return value


def _name(value: str | None, field_name: str) -> str | None:
    if value is not None and not re.fullmatch(NAME_PATTERN, value):
        raise invalid(field_name, f"must match {NAME_PATTERN}")
    return value


def _check_params(action: str, params: dict[str, Any]) -> None:
    """Every parameter of `action` of the type it must be (422 naming `params.<name>`): checked
    before the command is recorded, so a bad one queues nothing."""
    if action in ("rollback", "retry-partitions"):
        _name(_text(params, "runId"), "params.runId")
    if action == "rollback":
        _name(_text(params, "versionLabel"), "params.versionLabel")
        version = params.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise invalid("params.version", "must be an integer")
        partition = _text(params, "partition")
        if partition is not None:
            from pcbo_dagster.core.partition_keys import PartitionKeyError, validate_partition_key

            try:
                validate_partition_key(partition)
            except PartitionKeyError as exc:
                raise invalid("params.partition", str(exc)) from None
    if action == "rollback" or action.endswith("-rollout"):
        try:
            check_reason(_text(params, "reason"), "params.reason")
        except InvalidInput as exc:
            raise invalid("params.reason", exc.message) from None
    if action == "retry-partitions":
        keys = params.get("partitions")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise invalid("params.partitions", "give the partition keys to retry (a list of strings)")
    for name in ("repair", "dryRun"):
        _flag(params, name)
    if action == "verify":
        _ledger_anchors(params)


def _ledger_anchors(params: dict[str, Any]) -> list[Any]:
    """`params.trustedLedgers`: `DATASET/VERSION:SEQUENCE:HASH` texts, as `pcbo verify
    --trusted-ledger` takes them (422 naming the field otherwise)."""
    from pcbo_dagster.core.ledger_links import LedgerAnchor

    texts = params.get("trustedLedgers", [])
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise invalid("params.trustedLedgers", "give a list of DATASET/VERSION:SEQUENCE:HASH texts")
    try:
        return LedgerAnchor.parse_all(texts)
    except ValueError as exc:
        raise invalid("params.trustedLedgers", str(exc)) from None


class CommandRunner:
    def __init__(self, config: ServerConfig, catalog: CatalogStore, broker: EventBroker) -> None:
        self.config, self.catalog, self.broker = config, catalog, broker
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pcbo-command")
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        #: token subject -> its commands in flight (`COMMANDS_IN_FLIGHT_PER_SUBJECT`)
        self._in_flight: dict[str, int] = {}
        self._in_flight_lock = threading.Lock()

    # -- validation ---------------------------------------------------------------------------

    def prepare(self, principal: Principal, body: dict[str, Any]) -> Command:
        """Check the command (422 naming the field, 403 for a scope or dataset the token lacks)."""
        action, target, params = body["action"], body["target"], body["params"]
        if action not in ACTIONS:
            raise invalid("action", f"must be one of {', '.join(ACTIONS)}, not {action!r}")
        unknown = sorted(set(params) - PARAMS[action])
        if unknown:
            raise invalid(f"params.{unknown[0]}", f"is not a parameter of {action}")
        scope = ACTIONS[action]
        if action == "verify" and _flag(params, "repair"):
            scope = "admin"
        if not principal.has(scope):
            raise ApiError(403, "forbidden", f"{action} needs the {scope!r} scope")
        timeout = params.get("timeoutSeconds", self.config.command_timeout)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 86_400:
            raise invalid("params.timeoutSeconds", "must be a number of seconds above 0 and at most 86400")
        _check_params(action, params)
        dataset: str | None
        if action in ("verify", "gc"):
            if target != "all":
                raise invalid("target", f"{action} works on every dataset: the target is 'all'")
            dataset = None
        elif action.endswith("-rollout"):
            _name(target, "target")
            dataset = self._rollout_dataset(target)
        else:
            dataset = _name(target, "target")
        check_dataset(principal, dataset)
        run_id = params.get("runId")
        if action == "retry-partitions" and run_id is not None and dataset is not None:
            from pcbo_dagster.server.runs import check_run_id

            check_run_id(self.catalog, run_id, dataset, "params.runId")
        return Command(body["commandId"], action, target, params, principal.subject, dataset)

    def _rollout_dataset(self, name: str) -> str:
        from pcbo_dagster.rollout.operations import find_rollout

        try:
            return str(find_rollout(self.config.engine, name)["dataset"])
        except InvalidInput as exc:
            raise invalid("target", exc.message) from None

    # -- running ------------------------------------------------------------------------------

    def existing(self, command_id: str) -> dict[str, Any] | None:
        rows = self.catalog.command_phases(command_id)
        return command_state(rows) if rows else None

    def start(self, command: Command) -> dict[str, Any] | None:
        """Record the command `queued` and run it in the background; its state, or None when its
        `commandId` was recorded first by another request (nothing run: the caller answers that
        command's state to whoever may see it, as `GET /commands/{commandId}` does)."""
        if not self.accepting:
            raise ApiError(503, "shutting_down", "the server is shutting down: send the command again later")
        self._take_place(command.actor)
        try:
            command.logs.append(f"queued by {command.actor}")
            recorded = self.catalog.record_command_phase(**command.record("queued"))
        except BaseException:
            self._free_place(command.actor)
            raise
        if recorded is None:
            self._free_place(command.actor)
            return None
        self._publish(command, "queued")
        task = asyncio.get_running_loop().create_task(self._supervise(command))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        state = self.existing(command.command_id)
        assert state is not None
        return state

    def _take_place(self, subject: str) -> None:
        with self._in_flight_lock:
            if self._in_flight.get(subject, 0) >= COMMANDS_IN_FLIGHT_PER_SUBJECT:
                raise ApiError(
                    429,
                    "too_many_commands",
                    f"{subject} already has {COMMANDS_IN_FLIGHT_PER_SUBJECT} commands queued or running: "
                    "wait for one to end",
                    headers={"Retry-After": "5"},
                )
            self._in_flight[subject] = self._in_flight.get(subject, 0) + 1

    def _free_place(self, subject: str) -> None:
        with self._in_flight_lock:
            left = self._in_flight.get(subject, 0) - 1
            if left > 0:
                self._in_flight[subject] = left
            else:
                self._in_flight.pop(subject, None)

    def _publish(self, command: Command, phase: str, **extra: Any) -> None:
        self.broker.publish(
            "command.status",
            {
                "commandId": command.command_id,
                "action": command.action,
                "target": command.target,
                "actor": command.actor,
                "phase": phase,
                **extra,
            },
            command.dataset if command.dataset is not None else EVERY_DATASET,
        )

    async def _supervise(self, command: Command) -> None:
        """Run `command`; its place (`_take_place`) is freed when its engine work ends, past its
        timeout too."""
        work: asyncio.Future[tuple[str, Any, Any]] | None = None
        try:
            work = await self._run(command)
        finally:
            if work is None:
                self._free_place(command.actor)
            else:
                work.add_done_callback(lambda _done: self._free_place(command.actor))

    async def _run(self, command: Command) -> asyncio.Future[tuple[str, Any, Any]]:
        loop = asyncio.get_running_loop()
        timeout = float(command.params.get("timeoutSeconds", self.config.command_timeout))
        await loop.run_in_executor(self.executor, self._running, command)
        future = loop.run_in_executor(self.executor, self._perform, command)
        try:
            phase, outcome, after = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            command.logs.append(f"timed out after {timeout:g} s; the work goes on in the background")
            await loop.run_in_executor(
                None, self._finish, command, "timeout", {"timeoutSeconds": timeout}, None
            )
            future.add_done_callback(
                lambda f: log.info("command %s finished after its timeout", command.command_id)
            )
            return future
        await loop.run_in_executor(None, self._finish, command, phase, outcome, after)
        return future

    def _running(self, command: Command) -> None:
        command.logs.append("running")
        before = self._state(command)
        self.catalog.record_command_phase(**command.record("running", before_state=before))
        self._publish(command, "running")

    def _finish(self, command: Command, phase: str, outcome: Any, after: Any) -> None:
        self.catalog.record_command_phase(**command.record(phase, outcome=outcome, after_state=after))
        self._publish(command, phase, outcome=_summary(outcome))

    def _perform(self, command: Command) -> tuple[str, Any, Any]:
        from pcbo_dagster.server.errors import engine_error_response

        try:
            outcome = self._action(command)
            phase = "success"
            command.logs.append(f"done: {_summary(outcome)}")
        except Exception as exc:
            response = engine_error_response(exc)
            outcome = {"httpStatus": response.status_code, **json.loads(bytes(response.body))}
            phase = "error"
            command.logs.append(f"error: {outcome.get('message') or outcome.get('status')}")
        try:
            after = self._state(command)
        except Exception as exc:  # the state cannot be read: say so, keep the outcome
            after = {"error": type(exc).__name__}
        return phase, outcome, after

    # -- the actions --------------------------------------------------------------------------

    def _environment(self, command: Command, create: bool = False) -> Any:
        from pcbo_dagster.engine.environment import Environment

        return Environment.open(self.config.engine, create=create, actor=command.actor)

    def _action(self, command: Command) -> dict[str, Any]:
        params, target, actor = command.params, command.target, command.actor
        if command.action == "retry-partitions":
            return self._retry(command)
        if command.action == "rollback":
            from pcbo_dagster.engine.rollback import rollback

            env = self._environment(command)  # the parameters were checked before queuing
            try:
                return rollback(
                    env,
                    target,
                    _name(_text(params, "versionLabel", "v1"), "params.versionLabel") or "v1",
                    run_id=_name(_text(params, "runId"), "params.runId"),
                    partition_key=_text(params, "partition"),
                    version=params.get("version"),
                    reason=_text(params, "reason", f"requested by {actor}") or "requested",
                )
            finally:
                env.close()
        if command.action.endswith("-rollout"):
            from pcbo_dagster.rollout.operations import control

            return control(
                self.config.engine,
                target,
                command.action.removesuffix("-rollout"),
                by=actor,
                reason=_text(params, "reason", "") or "",
            )
        if command.action == "verify":
            from pcbo_dagster.engine.verify import verify

            env = self._environment(command)
            try:
                document = verify(env, repair=_flag(params, "repair"), anchors=_ledger_anchors(params))
            finally:
                env.close()
            if document["status"] != "clean":
                raise VerifyFindings("verify found problems (see the findings)", document)
            return document
        from pcbo_dagster.engine.garbage_collection import collect_garbage

        env = self._environment(command)
        try:
            return collect_garbage(env, dry_run=_flag(params, "dryRun"))
        finally:
            env.close()

    def _retry(self, command: Command) -> dict[str, Any]:
        """Execute again the partitions named, from the dataset's configured source (the request the
        Dagster asset would run), into the server's environment."""
        from pcbo_dagster.datasets.config import load_datasets_config_from_env
        from pcbo_dagster.datasets.requests import request_for_keys
        from pcbo_dagster.engine.backfill_commands import execute_request

        keys = command.params["partitions"]  # a list of strings (`_check_params`)
        config = load_datasets_config_from_env()
        try:
            dataset = config.dataset(command.target)
        except KeyError:
            raise InvalidInput("target", f"no dataset {command.target!r} in the datasets config") from None
        run_id = _name(_text(command.params, "runId"), "params.runId") or f"retry-{command.command_id}"[:128]
        request = request_for_keys(
            dataset,
            config.source_uri(dataset),
            run_id,
            keys,
            {"command": command.command_id, "by": command.actor},
        )
        lake = config.lake_url(dataset)
        settings = self.config.engine if lake is None else replace(self.config.engine, lake_url=lake)
        return execute_request(settings, json.dumps(request).encode("utf-8"), actor=command.actor)

    def _state(self, command: Command) -> dict[str, Any]:
        """What the command may change, before or after it: a dataset's current partition versions and
        chain head, a rollout's status and control, or every chain head (verify, gc)."""
        if command.action.endswith("-rollout"):
            from pcbo_dagster.rollout.operations import find_rollout

            rollout = find_rollout(self.config.engine, command.target)
            return {"rollout": command.target, "status": rollout["status"], "control": rollout["control"]}
        heads = {
            key: {"seq": seq, "eventHash": digest}
            for key, (seq, digest) in self.catalog.chain_heads().items()
        }
        if command.dataset is None:
            return {"chainHeads": heads}
        partitions = {}
        for row in self.catalog.partition_versions(command.dataset):
            if row["status"] == "committed":
                partitions[f"{row['version_label']}/{row['partition_key']}"] = {
                    "version": row["version"],
                    "merkleRoot": row["merkle_root"],
                    "recordCount": row["record_count"],
                }
        return {
            "dataset": command.dataset,
            "partitions": partitions,
            "chainHeads": {k: v for k, v in heads.items() if k.startswith(f"{command.dataset}/")},
        }

    def interrupt_unfinished(self) -> list[str]:
        """Give every command another process left queued or running (a server killed outright) its
        final phase, `error`, saying so: else it read `running` for ever and its id, posted again,
        ran nothing. Returns their ids."""
        reason = (
            "the server stopped while this command was queued or running: post the command again with "
            "a new commandId"
        )
        stale = []
        for row in self.catalog.unfinished_commands():
            fields = ("command_id", "actor", "action", "target", "dataset", "params")
            self.catalog.record_command_phase(
                **{name: row[name] for name in fields},
                phase="error",
                outcome={"error": "interrupted", "message": reason},
                logs=[*(row["logs"] or []), reason],
            )
            stale.append(row["command_id"])
        return stale

    async def shutdown(self, grace: float) -> None:
        self.accepting = False
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        self.executor.shutdown(wait=False, cancel_futures=True)


def _summary(outcome: Any) -> Any:
    """A few words of an outcome for the stream and the logs."""
    if not isinstance(outcome, dict):
        return outcome
    keys = ("status", "httpStatus", "error", "message", "rolledBack", "findings", "control", "timeoutSeconds")
    summary = {k: outcome[k] for k in keys if k in outcome and not isinstance(outcome[k], list | dict)}
    if isinstance(outcome.get("findings"), list):
        summary["findings"] = len(outcome["findings"])
    return summary
