"""Remote delivery of PAS events to an HTTP endpoint, in chain order, after the local backup.

Each event is POSTed on its own (`Content-Type: application/json`, body = the event's RFC 8785
bytes); a 2xx answer means delivered. Failures are retried with exponential backoff (tenacity):
connection errors, timeouts, 408, 425, 429 and 5xx. Other answers (3xx, 4xx) fail at once: a
redirect is not followed (it would turn the POST into a GET). Delivery of a chain stops at the
first event that still fails; later events wait, so the receiver always sees each chain in seq
order without gaps. Delivery is at least once: a crash after the receiver's 2xx but before the
cursor is written sends that event again next time (receivers deduplicate by `event_id` /
`chain.event_hash`).

Someone who can write the audit backup can write the cursor too. With the operator's key
(`PCBO_SIGNING_KEY`) the cursor carries `operator_signature`, a signed note by that key over the
chain key, the seq and the event hash (`core/operator_signatures.delivery_statement`), and only a
cursor that verifies under the key and names the event the backup holds at its seq is trusted. Any
other (unsigned, signed over another chain or place or by another key, not JSON, naming an event the
backup does not hold) is reported (`DeliveryReport.cursor_rejected`, a warning in the log) and
delivery starts again from seq 0: it re-sends, it never skips. A signed cursor copied back from an
earlier delivery only makes it re-send. Without a key nothing authenticates the cursor: a cursor
naming an event of the chain is followed (README, "Delivery to PCBO_AUDIT_ENDPOINT").

The per-chain cursor holds the last delivered `{chain_key, seq, event_hash}`: beside a local backup
the file `<dataset>/<versionLabel>.delivered`, replaced atomically (temp file, fsync, os.replace);
beside an object-store backup one object every host shares (`audit.object_store_backup`). It is
written under the chain's delivery lock, which is separate from the writer lock so a slow endpoint
never blocks appends. Hosts sharing an object-store backup each deliver from the shared cursor: two
of them may send an event twice, but each sends in seq order, so the first copy of every event
reaches the receiver in seq order, without gaps.

Credentials in the endpoint URL (`https://user:pass@host/...`) are sent as HTTP Basic
authorization; the userinfo and the query string never appear in reports, exceptions or logs.
The POST, its retries and the redaction are `pcbo_dagster.io.http_delivery.JsonPoster`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from pcbo_dagster.audit.backup import AuditBackupCorrupt, ChainBackup
from pcbo_dagster.core.audit_chain import event_hash, is_event_hash
from pcbo_dagster.core.canonical import jcs
from pcbo_dagster.core.operator_signatures import (
    OPERATOR_SIGNATURE,
    delivery_statement,
    sign_statement,
    signs_statement,
)
from pcbo_dagster.core.signed_note import SigningKey, VerifierKey
from pcbo_dagster.io.http_delivery import JsonPoster

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryReport:
    """Outcome of one `deliver_pending` call. Holds no secrets (the endpoint is redacted)."""

    chain_key: str
    endpoint: str
    delivered: int
    pending: int
    last_delivered_seq: int | None
    last_error: str | None = None
    #: Why the stored cursor was not trusted (delivery then started again from seq 0), or None.
    cursor_rejected: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing is left to deliver and nothing failed."""
        return self.pending == 0 and self.last_error is None

    def to_dict(self) -> dict:
        """camelCase form for command outputs."""
        return {
            "chainKey": self.chain_key,
            "endpoint": self.endpoint,
            "delivered": self.delivered,
            "pending": self.pending,
            "lastDeliveredSeq": self.last_delivered_seq,
            "lastError": self.last_error,
            "cursorRejected": self.cursor_rejected,
        }


def read_cursor(
    backup: ChainBackup, chain_key: str, verifier: VerifierKey | None = None
) -> tuple[int, str] | None:
    """The last delivered (seq, event_hash) of a chain, or None when nothing was delivered yet.

    ValueError when the cursor exists but is not a valid cursor for this chain or, with the operator's
    `verifier`, is not signed by its key over this chain, seq and event hash; `AuditBackupCorrupt` (a
    ValueError) when its name holds no regular file.
    """
    raw = backup.read_delivery_cursor(chain_key)
    name = f"of {chain_key}"
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"delivery cursor {name} is not JSON: {exc}") from exc
    seq = data.get("seq") if isinstance(data, dict) else None
    digest = data.get("event_hash") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("chain_key") != chain_key
        or not isinstance(seq, int)
        or isinstance(seq, bool)
        or seq < 0
        or not is_event_hash(digest)
    ):
        raise ValueError(f"delivery cursor {name} is not a cursor for {chain_key}")
    statement = delivery_statement(chain_key, seq, str(digest))
    if verifier is not None and not signs_statement(data.get(OPERATOR_SIGNATURE), statement, verifier):
        raise ValueError(
            f"delivery cursor {name} (seq {seq}) is not signed by the operator's key "
            f"({verifier.name}+{verifier.key_id.hex()}) over that chain, seq and event hash"
        )
    return seq, str(digest)


def _write_cursor(backup: ChainBackup, chain_key: str, seq: int, digest: str, key: SigningKey | None) -> None:
    cursor: dict[str, object] = {"chain_key": chain_key, "seq": seq, "event_hash": digest}
    if key is not None:
        cursor[OPERATOR_SIGNATURE] = sign_statement(key, delivery_statement(chain_key, seq, digest))
    backup.write_delivery_cursor(chain_key, jcs(cursor) + b"\n")


def checked_cursor(
    backup: ChainBackup, chain_key: str, events: list[dict], verifier: VerifierKey | None
) -> tuple[tuple[int, str] | None, str | None]:
    """The chain's delivery cursor when it is trusted, else None and why (None, None: there is none).
    Trusted: a cursor for this chain (`read_cursor`; with the operator's `verifier`, signed by its key
    over that place) naming the event the backup's chain `events` holds at its seq. `AuditBackupCorrupt`
    when its name holds no regular file."""
    try:
        cursor = read_cursor(backup, chain_key, verifier)
    except AuditBackupCorrupt:
        raise
    except ValueError as exc:
        return None, str(exc)
    if cursor is None:
        return None, None
    seq, digest = cursor
    anchor = events[seq] if seq < len(events) else None
    anchor_chain = anchor.get("chain") if isinstance(anchor, dict) else None
    if (
        not isinstance(anchor_chain, dict)
        or anchor_chain.get("seq") != seq
        or anchor_chain.get("event_hash") != digest
    ):
        return None, (
            f"delivery cursor of {chain_key} (seq {seq}) names no event the audit backup holds at that seq"
        )
    return cursor, None


class HttpDelivery(JsonPoster):
    """POST events to `endpoint` (http or https) with retries and exponential backoff.

    `attempts` tries per event; waits start at `initial_wait` seconds and double up to `max_wait`;
    `timeout` bounds each request. `headers` are added to every request (e.g. a bearer token);
    their values are never reported. The HTTP part is `JsonPoster`'s (`pcbo_dagster.io.http_delivery`).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        attempts: int = 3,
        initial_wait: float = 0.5,
        max_wait: float = 5.0,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            endpoint,
            name="audit endpoint",
            label="audit delivery",
            user_agent="pcbo-audit-delivery/1",
            headers=headers,
            attempts=attempts,
            initial_wait=initial_wait,
            max_wait=max_wait,
            timeout=timeout,
            logger=logger,
        )

    def __repr__(self) -> str:
        return f"HttpDelivery({self.endpoint!r}, attempts={self.attempts})"

    def send(self, event: dict) -> None:
        """Deliver one event (its JCS bytes), retrying; raises RuntimeError (`DeliveryFailed`, a
        redacted `<endpoint>: seq <n>: <reason>` message) when it still fails."""
        self.post(jcs(event), f"seq {event.get('chain', {}).get('seq')}")

    def deliver_pending(
        self, backup: ChainBackup, chain_key: str, signing_key: SigningKey | None = None
    ) -> DeliveryReport:
        """Deliver, in seq order, every backed-up event after the chain's cursor.

        Stops at the first event that still fails after retries (or at a local chain defect: an event
        that does not continue the delivered prefix is never sent). A cursor that is not trusted
        (`checked_cursor`) is reported and delivery starts from seq 0; with `signing_key` each cursor
        written is signed. Never raises for delivery failures; the report says what is left.
        """
        delivered = 0
        with backup.delivery_locked(chain_key):
            events = backup.read_chain(chain_key)
            try:
                cursor, rejected = checked_cursor(
                    backup, chain_key, events, None if signing_key is None else signing_key.verifier()
                )
            except AuditBackupCorrupt as exc:  # (no regular file there: only this delivery stops)
                return self._report(chain_key, 0, len(events), None, str(exc))
            if rejected is not None:
                rejected += "; delivery starts again from seq 0 (receivers deduplicate)"
                logger.warning("audit delivery: %s", rejected)
            start = 0 if cursor is None else cursor[0] + 1
            prev = None if cursor is None else cursor[1]
            last_seq = None if cursor is None else cursor[0]
            error: str | None = None
            for index in range(start, len(events)):
                event = events[index]
                chain = event.get("chain") if isinstance(event, dict) else None
                if (
                    not isinstance(chain, dict)
                    or chain.get("chain_key") != chain_key
                    or chain.get("seq") != index
                    or chain.get("prev_event_hash") != prev
                    or chain.get("event_hash") != _safe_hash(event)
                ):
                    error = (
                        f"local backup of {chain_key} is broken at position {index}; "
                        "delivery stopped (run verify)"
                    )
                    logger.error("audit delivery: %s", error)
                    return self._report(chain_key, delivered, len(events) - index, last_seq, error, rejected)
                try:
                    self.send(event)
                except RuntimeError as exc:
                    error = str(exc)
                    logger.warning(
                        "audit delivery: %s; %d event(s) of %s left pending",
                        error,
                        len(events) - index,
                        chain_key,
                    )
                    return self._report(chain_key, delivered, len(events) - index, last_seq, error, rejected)
                _write_cursor(backup, chain_key, index, chain["event_hash"], signing_key)
                delivered += 1
                last_seq = index
                prev = chain["event_hash"]
            return self._report(chain_key, delivered, 0, last_seq, None, rejected)

    def _report(
        self,
        chain_key: str,
        delivered: int,
        pending: int,
        last_seq: int | None,
        error: str | None,
        rejected: str | None = None,
    ) -> DeliveryReport:
        return DeliveryReport(
            chain_key=chain_key,
            endpoint=self.endpoint,
            delivered=delivered,
            pending=pending,
            last_delivered_seq=last_seq,
            last_error=None if error is None else self.scrub(error),
            cursor_rejected=rejected,
        )


def _safe_hash(event: dict) -> str | None:
    try:
        return event_hash(event)
    except Exception:  # noqa: BLE001 - an event that cannot be hashed is a broken event
        return None
