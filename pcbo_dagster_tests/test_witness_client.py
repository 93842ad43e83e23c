"""What `pcbo` accepts back from a witness (c2sp.org/tlog-witness `add-checkpoint`): a witness key the
operator trusts whose server answers 200 with lines that are not one plain cosignature v1 of the
checkpoint asked. Each rogue witness is a real HTTP server on loopback answering what a test makes it
answer; the runs are real `pcbo execute`s."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pcbo_dagster.cli import main as cli
from pcbo_dagster.core import merkle
from pcbo_dagster.core.checkpoints import Checkpoint, parse_add_checkpoint_body
from pcbo_dagster.core.signed_note import (
    COSIGNATURE_V1,
    NoteSignature,
    SigningKey,
    cosignature_message,
    cosignature_timestamp,
    new_signing_key,
)
from pcbo_dagster.witness.client import Witness, WitnessRefused, request_cosignature
from pcbo_dagster_tests.cli_runner import load_generator, write_request
from pcbo_dagster_tests.loopback import DripReceiver, serving

LOG = new_signing_key("ops.example/operator")
WITNESS = new_signing_key("witness.example/w1")


def _line(key: SigningKey, text: str, timestamp: int) -> str:
    """A cosignature v1 line by `key` on `text` at `timestamp`, whatever the timestamp (`cosign`
    refuses the ones the protocol forbids)."""
    signature = key.sign(cosignature_message(text, timestamp))
    raw = timestamp.to_bytes(8, "big") + signature
    return NoteSignature(key.name, key.verifier(COSIGNATURE_V1).key_id, raw).line


@pytest.fixture
def rogue_witness() -> Iterator[Callable[[Callable[[str], str]], str]]:
    """Starts an HTTP server answering each add-checkpoint 200 with `answer(checkpoint text)`."""

    def start(answer: Callable[[str], str]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers["Content-Length"]))
                data = answer(parse_add_checkpoint_body(body).checkpoint.text).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return servers.enter_context(serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)))

    with contextlib.ExitStack() as servers:
        yield start


def _ask(url: str) -> tuple[NoteSignature, int]:
    checkpoint = Checkpoint("pcbo/events/v1", 3, merkle.MerkleTree([b"a", b"b", b"c"]).root)
    witness = Witness(WITNESS.verifier(COSIGNATURE_V1), url)
    return request_cosignature(witness, checkpoint, checkpoint.sign(LOG), 0, lambda old: [])


def _execute(tmp_path: Path, url: str) -> tuple[int, Any]:
    key_file = tmp_path / "operator.key"
    key_file.write_text(LOG.text + "\n")
    key_file.chmod(0o600)
    request = load_generator().make_request(records=20, partitions=2, seed=3, run_id="r1")
    out = tmp_path / f"out-{uuid.uuid4().hex}.json"
    witness = f"{WITNESS.verifier(COSIGNATURE_V1).text} {url}"
    args = ["execute", "--input", str(write_request(tmp_path / "r.json", request))]
    args += ["--signing-key", str(key_file), "--witness", witness, "--home", str(tmp_path / "home")]
    try:
        status = cli.main([*args, "--output", str(out)])
    except SystemExit as exc:
        status = int(exc.code or 0)
    return status, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("timestamp", [2**64 - 1, 2**63, 0])
def test_a_cosignature_whose_timestamp_the_protocol_forbids_is_refused_and_never_fails_the_run(
    tmp_path: Path, rogue_witness, timestamp: int
) -> None:
    """c2sp.org/tlog-cosignature: the timestamp "MUST NOT exceed 2^63 - 1"; c2sp.org/tlog-witness:
    it "MUST NOT be zero". The client kept any timestamp a valid signature carried: one above 2^63 - 1
    does not fit the catalog's BIGINT, so recording it raised and the run failed, though a witness
    never fails a run. Now such a cosignature is no cosignature v1: the witness is reported as
    refusing, and the run succeeds unwitnessed."""
    url = rogue_witness(lambda text: _line(WITNESS, text, timestamp))
    with pytest.raises(WitnessRefused, match="timestamp"):
        _ask(url)
    status, document = _execute(tmp_path, url)
    assert status == 0, document
    assert document["checkpoint"]["witnessedBy"] == []
    assert "timestamp" in document["checkpoint"]["witnessErrors"][0]


def test_of_several_cosignatures_in_an_answer_the_one_kept_carries_its_own_timestamp(rogue_witness) -> None:
    """A witness may answer several lines (c2sp.org/tlog-witness: "one or more"). The client kept the
    first line by the witness's key but the timestamp of the last, so the catalog row's `cosigned_at`
    was not the time its `signature_line` states. Now it keeps the newest line, with its timestamp."""
    url = rogue_witness(lambda text: _line(WITNESS, text, 1700000500) + _line(WITNESS, text, 1700000000))
    line, timestamp = _ask(url)
    assert timestamp == cosignature_timestamp(line) == 1700000500
    url = rogue_witness(lambda text: _line(WITNESS, text, 1700000000) + _line(WITNESS, text, 1700000500))
    line, timestamp = _ask(url)
    assert timestamp == cosignature_timestamp(line) == 1700000500


def test_an_answer_that_is_not_a_cosignature_of_the_checkpoint_asked_is_refused(rogue_witness) -> None:
    """A line by the witness's key over another checkpoint (another size, or one line of two), a line
    of another key with the witness's name, or no line by its key: never kept."""
    other = Checkpoint("pcbo/events/v1", 2, merkle.MerkleTree([b"a", b"b"]).root).text
    impostor = SigningKey(WITNESS.name, new_signing_key("x").private_key)
    for answer in (
        lambda text: _line(WITNESS, other, 1700000000),
        lambda text: _line(WITNESS, text, 1700000000) + _line(WITNESS, other, 1700000000),
        lambda text: _line(impostor, text, 1700000000),
        lambda text: _line(new_signing_key("witness.example/w2"), text, 1700000000),
    ):
        with pytest.raises(WitnessRefused):
            _ask(rogue_witness(answer))


def test_a_409_naming_the_very_size_asked_below_the_checkpoints_is_reported_as_such(rogue_witness) -> None:
    """A `409` names the size the witness holds; one naming the very size the request said (here 0, for
    a checkpoint of size 3: not the pre-C2SP#280 answer to another root at its own size) contradicts
    itself. It was reported as "the witness's size kept changing", which it never did."""

    class Conflict(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            data = f"{parse_add_checkpoint_body(body).old_size}\n".encode()
            self.send_response(409)
            self.send_header("Content-Type", "text/x.tlog.size")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Conflict)) as url:
        with pytest.raises(WitnessRefused, match=r"409 naming the very size asked \(0\)"):
            _ask(url)


def test_a_409_and_the_request_made_again_end_within_one_timeout(rogue_witness) -> None:
    """The README: "the whole exchange ends within 5 s however slowly the witness answers". Each of the
    two requests a `409` leads to had its own timeout, so a witness answering each just inside it held
    the run twice as long. Now the request made again has only the time the first one left: here
    each answer takes 70% of the timeout, and the second is cut off."""

    class SlowConflictThenCosign(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            request = parse_add_checkpoint_body(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(1.4)
            if request.old_size == 0:
                status, kind, data = 409, "text/x.tlog.size", b"2\n"
            else:
                status, kind = 200, "text/plain; charset=utf-8"
                data = _line(WITNESS, request.checkpoint.text, 1700000000).encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    checkpoint = Checkpoint("pcbo/events/v1", 3, merkle.MerkleTree([b"a", b"b", b"c"]).root)
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), SlowConflictThenCosign)) as url:
        witness = Witness(WITNESS.verifier(COSIGNATURE_V1), url)
        with pytest.raises(WitnessRefused, match="no whole answer within 2 s"):
            request_cosignature(witness, checkpoint, checkpoint.sign(LOG), 0, lambda old: [], timeout=2)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_witness_that_answers_with_a_redirect_is_refused_and_the_redirect_never_followed(
    status: int,
) -> None:
    """The client followed a witness's 301, 302 or 303 as urllib does, turning the POST into a GET of
    whatever URL the answer named (another host, an internal address), and put up to 300 characters
    of that URL's error answer in the run's `witnessErrors`. A witness never redirects (c2sp.org/
    tlog-witness); the audit delivery refuses redirects for the same reason. Now a 3xx is the witness
    refusing, and the URL it names is never asked."""
    asked: list[str] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            asked.append(f"GET {self.path}")
            data = b"internal secret page"
            self.send_response(404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)) as elsewhere:

        class Redirecting(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                self.send_header("Location", elsewhere + "/internal")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        with serving(ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)) as url:
            with pytest.raises(WitnessRefused, match=f"HTTP {status}") as refused:
                _ask(url)
    assert asked == []
    assert "secret" not in str(refused.value)


@pytest.fixture
def dripping_witness() -> Iterator[str]:
    """A witness URL whose server answers `200 OK` and then drips header lines, a byte every 0.03 s
    (each within any per-read timeout), never finishing its answer."""
    receiver = DripReceiver(b"HTTP/1.1 200 OK\r\n", b"X-Drip: y\r\n", gap=0.03)
    try:
        yield receiver.url.removesuffix("/hooks")
    finally:
        receiver.close()


def test_a_witness_that_drips_its_answer_is_given_up_at_the_timeout(tmp_path: Path, dripping_witness) -> None:
    """The client's timeout bounded each socket read, not the request: a witness (or anyone on the path
    of a plain-http witness) sending a header line every few seconds held `request_cosignature`, and
    so the run asking it, for as long as it liked. Now the whole exchange ends at the timeout and the
    witness is reported as refusing; the run goes on."""
    checkpoint = Checkpoint("pcbo/events/v1", 3, merkle.MerkleTree([b"a", b"b", b"c"]).root)
    witness = Witness(WITNESS.verifier(COSIGNATURE_V1), dripping_witness)
    started = time.monotonic()
    with pytest.raises(WitnessRefused, match="no whole answer within 1 s"):
        request_cosignature(witness, checkpoint, checkpoint.sign(LOG), 0, lambda old: [], timeout=1)
    assert time.monotonic() - started < 3
    started = time.monotonic()
    status, document = _execute(tmp_path, dripping_witness)
    assert status == 0 and document["checkpoint"]["witnessedBy"] == [], document
    assert "no whole answer" in document["checkpoint"]["witnessErrors"][0]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("witnesses", "said"),
    [
        # one witness's key twice (a second URL, or another name for the same key): its cosignatures
        # would count as two witnesses'
        (
            [
                f"{WITNESS.verifier(COSIGNATURE_V1).text} http://127.0.0.1:9/a",
                f"{WITNESS.verifier(COSIGNATURE_V1).text} http://127.0.0.1:9/b",
            ],
            "its key is given already",
        ),
        (
            [
                f"{WITNESS.verifier(COSIGNATURE_V1).text} http://127.0.0.1:9/a",
                f"{SigningKey('other.example/w9', WITNESS.private_key).verifier(COSIGNATURE_V1).text} http://127.0.0.1:9/b",
            ],
            "its key is given already",
        ),
        # a URL the client cannot ask as given: credentials (urllib took `user:secret@host` for the
        # host name and sent it, secret included, to the DNS resolver), a query or fragment (the
        # client appends `/add-checkpoint` to the URL), a port out of range
        *(
            ([f"{WITNESS.verifier(COSIGNATURE_V1).text} {url}"], said)
            for url, said in (
                ("http://user:s3cret@127.0.0.1:9", "credentials"),
                ("http://127.0.0.1:9/w?token=1", "query"),
                ("http://127.0.0.1:9/w#a", "fragment"),
                ("http://127.0.0.1:99999", "port"),
                # an unclosed IPv6 bracket was an internal error (urlsplit's ValueError), a control
                # character was taken and every cosignature request then failed
                ("http://[::1", "not an http(s) URL"),
                ("http://127.0.0.1:9/w\x01x", "not an http(s) URL"),
            )
        ),
        # the operator's own key as a witness: it would witness the checkpoints it signs itself
        (
            [
                f"{SigningKey('witness.example/me', LOG.private_key).verifier(COSIGNATURE_V1).text} http://127.0.0.1:9"
            ],
            "the operator's",
        ),
    ],
)
def test_a_witness_list_naming_one_key_twice_the_operators_own_or_an_unusable_url_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], witnesses: list[str], said: str
) -> None:
    """`--min-witnesses` counts a witness key once, whatever name it signs under, and never the
    operator's (`witness_requirement`); the publishing side now holds its list to the same rules, and
    refuses a URL it cannot ask as given: exit 2 naming the field, and no home made."""
    key_file = tmp_path / "operator.key"
    key_file.write_text(LOG.text + "\n")
    key_file.chmod(0o600)
    request = load_generator().make_request(records=20, partitions=2, seed=3, run_id="r1")
    args = ["execute", "--input", str(write_request(tmp_path / "r.json", request))]
    args += ["--signing-key", str(key_file), "--home", str(tmp_path / "home")]
    for witness in witnesses:
        args += ["--witness", witness]
    try:
        status = cli.main([*args, "--output", str(tmp_path / "out.json")])
    except SystemExit as exc:
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert "--witness" in err and said in err and "s3cret" not in err, err
    assert not (tmp_path / "home").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("by_flag", [True, False], ids=["--witness", "PCBO_WITNESSES"])
def test_witnesses_without_a_signing_key_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, by_flag: bool
) -> None:
    """Witnesses cosign the checkpoints the signing key signs: with no signing key a run signed nothing,
    asked no witness and said so nowhere (`checkpoint: null`, exit 0), the operator believing its
    history witnessed. Now exit 2 naming the witness setting and the key's, and no home made."""
    monkeypatch.delenv("PCBO_SIGNING_KEY", raising=False)
    request = load_generator().make_request(records=20, partitions=2, seed=3, run_id="r1")
    args = ["execute", "--input", str(write_request(tmp_path / "r.json", request))]
    args += ["--home", str(tmp_path / "home"), "--output", str(tmp_path / "out.json")]
    entry = f"{WITNESS.verifier(COSIGNATURE_V1).text} http://127.0.0.1:9"
    if by_flag:
        args += ["--witness", entry]
    else:
        monkeypatch.setenv("PCBO_WITNESSES", entry)
    try:
        status = cli.main(args)
    except SystemExit as exc:
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert ("--witness" if by_flag else "PCBO_WITNESSES") in err and "PCBO_SIGNING_KEY" in err, err
    assert not (tmp_path / "home").exists() and not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("status", [422, 500])
def test_a_witness_s_refusal_is_quoted_on_one_line_without_control_characters(status: int) -> None:
    """Red-team finding: a refusal quoted the witness's answer as it came, CR, LF and escapes included,
    into the `witness: ...` warning and the report's `witnessErrors`: a hostile witness wrote lines of
    its own making into pcbo's log (a forged `checkpoint witnessed` line, a terminal escape). Its text
    is now quoted on one line, control characters shown escaped."""
    forged = "nope\r\n2026-12-08 01:00:00 INFO pcbo: checkpoint witnessed by all\x1b[2K\x85\u2028end"

    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            data = forged.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Refusing)) as url:
        with pytest.raises(WitnessRefused) as refused:
            _ask(url)
    message = str(refused.value)
    assert "nope 2026-12-08 01:00:00 INFO pcbo: checkpoint witnessed by all\\x1b[2K" in message, message
    assert message.isprintable(), message
