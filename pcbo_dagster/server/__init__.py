"""`pcbo serve`: the engine behind an authenticated HTTP API (FastAPI on uvicorn).

- `config`: the server's settings (the engine's, plus limits, intervals and Dagster);
- `auth`: bearer tokens, scopes and dataset limits (fail closed);
- `errors`: the engine's errors as HTTP answers (422 naming the field, 409 for gates);
- `broker`: the Server-Sent Events broker (bounded per-client queues);
- `reconciliation`: the periodic catalog / lake / chain comparison;
- `runs`: executes in worker threads (synchronous, `Prefer: respond-async`, Dagster), idempotency;
- `commands`: maintenance commands with before/after state, recorded in `command_audit`;
- `status`: registered services and the admin status;
- `routes_*`: the endpoints by area; `app`: the application factory and its lifespan.
"""
