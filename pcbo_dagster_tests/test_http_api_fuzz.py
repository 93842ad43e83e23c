"""Property-based fuzzing of the live API with schemathesis, from the OpenAPI document the server
serves: no answer is a 5xx, and every answer (status, content type, body) matches the document.

Bounded: a few examples per operation (`FUZZ_EXAMPLES`), a server limit of 24 partitions a request
(so a fuzzed execute stays small), and the endless event stream left out (its own tests cover it).
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pcbo_dagster_tests.http_server import DEMO_REQUEST, running_server  # noqa: E402

FUZZ_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    with running_server(home, max_partitions=24, reconcile_seconds=3600) as server:
        token = server.token("fuzzer", "admin")
        client = server.client(token)
        assert client.post("/v1/execute", content=DEMO_REQUEST.read_bytes()).status_code == 200
        yield server, token


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    server, token = fuzzed_server
    return schemathesis.openapi.from_url(
        f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {token}"}
    )


schema = schemathesis.pytest.from_fixture("api_schema").exclude(path="/reconciliation/stream")


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
    derandomize=True,
)
def test_the_api_never_answers_5xx_and_matches_its_schema(case, fuzzed_server):
    _, token = fuzzed_server
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, timeout=60)


def test_the_openapi_document_is_served(fuzzed_server):
    server, token = fuzzed_server
    document = server.client(token).get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for path in (
        "/v1/plan",
        "/v1/dry-run",
        "/v1/execute",
        "/v1/runs/{runId}",
        "/v1/datasets",
        "/v1/datasets/{dataset}/partitions",
        "/v1/datasets/{dataset}/partitions/{key}/proof",
        "/v1/datasets/{dataset}/consistency",
        "/reconciliation/stream",
        "/reconciliation/audit",
        "/commands/run",
        "/services/registered",
        "/v1/admin/status",
        "/healthz",
    ):
        assert path in document["paths"], path
    assert "BackfillRequest" in document["components"]["schemas"]
