"""A bug of the gateway's own is a logged 500, never a silent 400; a request the gateway
refused while parsing is answered once (httptools wraps what a parser callback raises in
HttpParserCallbackError, which must not be taken for malformed input)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from gateway.config import Limits
from gateway.ring import ShardRing
from tests.proxy.harness import KEY_HEADER, Harness, harness, responses_in


@pytest.fixture
def plane() -> Iterator[Harness]:
    with harness(Limits(max_header_bytes=1024)) as h:
        yield h


def _request(extra: bytes = b"") -> bytes:
    return b"POST /orders HTTP/1.1\r\nHost: a\r\n%s: alice\r\n%sContent-Length: 2\r\n\r\n{}" % (
        KEY_HEADER.encode(),
        extra,
    )


def test_a_bug_while_reading_a_request_is_a_logged_500(
    plane: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_lookup(*args: object) -> object:
        raise RuntimeError("a bug in the router")

    # The ring's key lookup (a Python-level method call in both builds: the compiled client
    # calls the router's functions directly, so patching them on the module would not reach it).
    monkeypatch.setattr(ShardRing, "cached_owner", broken_lookup)
    client, transport = plane.connect()
    with caplog.at_level(logging.ERROR):
        plane.feed(client, [_request()])
        plane.wait_for(lambda: transport.closed)
    [(status, headers, body)] = responses_in(transport.written)
    assert status == 500
    assert json.loads(body)["error"] == "internal_error"
    assert headers[b"connection"] == b"close"
    assert plane.upstream.heads == []
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert logged and "a bug in the router" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert plane.metrics.refusals == {"internal_error": 1}


@pytest.mark.parametrize(
    ("extra", "status", "code"),
    [
        (b"X-Big: " + b"x" * 2000 + b"\r\n", 431, "headers_too_large"),
        (b"Transfer-Encoding: chunked\r\n", 400, "bad_request"),
    ],
)
def test_a_request_refused_while_parsing_is_answered_once(
    plane: Harness, extra: bytes, status: int, code: str
) -> None:
    client, transport = plane.connect()
    client.data_received(_request(extra))  # one read, and what it left behind, at once
    assert transport.closed
    assert client.exchanges == [], "nothing may stay queued behind the refusal (a phantom 400)"
    answers = responses_in(transport.written)
    assert [(s, json.loads(b)["error"]) for s, _, b in answers] == [(status, code)]
    assert plane.metrics.refusals == {code: 1}
