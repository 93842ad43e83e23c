"""Where the steps of a dataset's asset pass their handles (`GateHandle`, `EmissionHandle`): as JSON in
the Dagster instance's own database (its run storage's key-value table), which every host of a
deployment shares, not on a host's disk.

Dagster's default IO manager pickles a step's output under the `DAGSTER_HOME` of the host that ran the
step (`storage/<run>/<step>/result`): with the celery or k8s executor the next step runs on another
host (a worker, a pod) whose `DAGSTER_HOME` is its own, and it failed there (`FileNotFoundError`),
the run stopping after emission with its partitions committed and no audit events. The handles are
small (run ids, request JSON, hashes, per partition its version and manifest checksum) and only the
types listed here are read back: nothing is unpickled, and a value naming another type is refused.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import dagster as dg

#: The IO manager key of the handles' outputs (`steps.build_steps`), a resource of each dataset asset.
HANDLE_IO_MANAGER_KEY = "pcbo_handles"
_PREFIX = "pcbo.step-handle/1"


def _types() -> dict[str, type]:
    from pcbo_dagster.dagster_defs.backfill.steps import EmissionHandle, GateHandle, RequestHandle
    from pcbo_dagster.engine.execute import Emission, EmittedPartition, Refusal

    return {
        cls.__name__: cls
        for cls in (GateHandle, RequestHandle, EmissionHandle, Emission, EmittedPartition, Refusal)
    }


def encode_handle(value: Any) -> str:
    """`value` (a handle) as JSON: dataclasses and tuples tagged, so `decode_handle` gives it back."""
    types = _types()

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            name = type(v).__name__
            if types.get(name) is not type(v):
                raise TypeError(f"{name} is not a step handle")
            fields = {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
            return {"$type": name, "fields": fields}
        if isinstance(v, tuple):
            return {"$tuple": [plain(x) for x in v]}
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {"$dict": {str(k): plain(x) for k, x in v.items()}}
        if v is None or isinstance(v, str | int | float | bool):
            return v
        raise TypeError(f"{type(v).__name__} is not part of a step handle")

    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"))


def decode_handle(text: str) -> Any:
    """The handle `encode_handle` wrote; `ValueError` for anything else."""
    types = _types()

    def build(v: Any) -> Any:
        if isinstance(v, list):
            return [build(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {"$tuple"} and isinstance(v["$tuple"], list):
                return tuple(build(x) for x in v["$tuple"])
            if set(v) == {"$dict"} and isinstance(v["$dict"], dict):
                return {k: build(x) for k, x in v["$dict"].items()}
            if set(v) == {"$type", "fields"} and v["$type"] in types and isinstance(v["fields"], dict):
                cls = types[v["$type"]]
                names = {f.name for f in dataclasses.fields(cls)}
                if not set(v["fields"]) <= names:
                    raise ValueError(f"{v['$type']} with fields it does not have")
                return cls(**{k: build(x) for k, x in v["fields"].items()})
            raise ValueError("not a step handle")
        if v is None or isinstance(v, str | int | float | bool):
            return v
        raise ValueError("not a step handle")

    return build(json.loads(text))


def _key(run_id: str, step_key: str, output_name: str) -> str:
    return f"{_PREFIX}/{run_id}/{step_key}/{output_name}"


class HandleStorage(dg.IOManager):
    """The handles of a run's steps in its Dagster instance's key-value table (module doc)."""

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        instance = context.step_context.instance
        instance.run_storage.set_cursor_values(
            {_key(context.run_id, context.step_key, context.name): encode_handle(obj)}
        )

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        assert upstream is not None
        key = _key(upstream.run_id, upstream.step_key, upstream.name)
        text = context.instance.run_storage.get_cursor_values({key}).get(key)
        if text is None:
            raise dg.Failure(
                description=f"the output {upstream.name!r} of step {upstream.step_key} of run "
                f"{upstream.run_id} is not in the Dagster instance (a step run before pcbo stored its "
                "handles there: run the partitions again)",
                allow_retries=False,
            )
        try:
            # (Whose run the handle is, and whether its requests are the run's own, the step reading it
            # checks: a run re-executed from a later step passes on its parent run's gate.)
            return decode_handle(text)
        except (ValueError, TypeError) as exc:
            raise dg.Failure(
                description=f"the stored output of step {upstream.step_key} of run {upstream.run_id} is not "
                f"a step handle ({exc})",
                allow_retries=False,
            ) from None


#: One definition for every dataset asset (Dagster refuses two different ones under one key).
HANDLE_IO_MANAGER = dg.IOManagerDefinition.hardcoded_io_manager(
    HandleStorage(), description="pcbo's step handles, as JSON in the Dagster instance"
)
