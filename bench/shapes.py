"""The requests the benchmark sends: Ingress-shaped (the default rows) and bare.

**ingress**: what ingress-nginx sends to its upstream (here: the proxy under test) for a
client's JSON `POST` over HTTPS, with the controller's defaults. Its template
(`rootfs/etc/nginx/template/nginx.tmpl`, location block) sets, in this order: `Host`
(`$best_http_host`: the client's), `X-Request-ID` (`$req_id`: the client's, else nginx's
`$request_id`, 32 hex digits, as `generate-request-id` is on), `X-Real-IP` and
`X-Forwarded-For` (both `$remote_addr`: `use-forwarded-headers` and
`compute-full-forwarded-for` are off), `X-Forwarded-Host`, `X-Forwarded-Port`,
`X-Forwarded-Proto`, `X-Forwarded-Scheme`, `X-Scheme`; `Upgrade`, `Connection` (upstream
keep-alive is on), `X-Original-Forwarded-For/-Host` (the client sent none) and `Proxy` are
empty, so nginx sends none of them; `Content-Length` follows from nginx's own defaults. Then
the client's own fields: `User-Agent`, `Accept`, `Content-Type`, `traceparent` (W3C, sampled)
and the shard key `User-ID`; a JSON body of ~200 bytes. `User-ID`, `X-Request-ID`, the client
address and the `traceparent` ids differ between the pre-formatted requests.

**bare**: `Host`, `Content-Type`, `User-ID`, `Content-Length` and a small JSON body: what the
benchmark sent before issue 13 (a request that the gateway forwards without rebuilding its head).

Requests are pre-formatted once (`write_requests`) and replayed by `bench/post.lua`, so that wrk
spends no CPU on building them. Every value is derived from the request's index (a BLAKE2
digest), so the same index gives the same bytes in every run. The client addresses are from
the documentation ranges (RFC 5737): header values only, no traffic goes there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

SHAPES = ("ingress", "bare")
LABELS = {"ingress": "Ingress-shaped", "bare": "bare"}
REQUESTS = 10_000  # pre-formatted requests per shape: the User-ID working set
PATH = "/orders"
KEY_HEADER = "User-ID"

INGRESS_HOST = "shop.example.com"
BARE_HOST = "127.0.0.1"
USER_AGENT = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
BARE_BODY = b'{"item":"book","qty":1,"note":"shardgate bench"}'
CLIENT_NETWORKS = ("203.0.113", "198.51.100", "192.0.2")  # RFC 5737 documentation ranges

Headers = list[tuple[str, str]]


def _hex(kind: str, index: int, digits: int) -> str:
    """``digits`` hex digits, fixed by (kind, index); never all zeros (W3C forbids zero ids)."""
    digest = hashlib.blake2b(f"{kind}-{index}".encode(), digest_size=digits // 2).hexdigest()
    return digest if digest.strip("0") else "1".rjust(digits, "0")


def user_id(index: int) -> str:
    return f"user-{index % REQUESTS:05d}"


def client_address(index: int) -> str:
    network = CLIENT_NETWORKS[index % len(CLIENT_NETWORKS)]
    return f"{network}.{index % 254 + 1}"


def traceparent(index: int) -> str:
    """A valid W3C trace context: version 00, trace id, parent (span) id, flags 01 (sampled)."""
    return f"00-{_hex('trace', index, 32)}-{_hex('span', index, 16)}-01"


def ingress_body(index: int) -> bytes:
    order = {
        "order_id": f"ord-{index:06d}",
        "customer": user_id(index),
        "items": [
            {"sku": "BK-1042", "qty": 1, "unit_price": "19.99"},
            {"sku": "MG-0007", "qty": 2, "unit_price": "4.50"},
        ],
        "currency": "EUR",
        "shipping": {"method": "standard", "country": "DE"},
    }
    return json.dumps(order, separators=(",", ":")).encode()


def ingress_headers(index: int, body: bytes) -> Headers:
    """The fields of request ``index`` as ingress-nginx forwards it (see the module docstring)."""
    address = client_address(index)
    return [
        ("Host", INGRESS_HOST),
        ("X-Request-ID", _hex("request-id", index, 32)),
        ("X-Real-IP", address),
        ("X-Forwarded-For", address),
        ("X-Forwarded-Host", INGRESS_HOST),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Scheme", "https"),
        ("X-Scheme", "https"),
        ("Content-Length", str(len(body))),
        ("User-Agent", USER_AGENT),
        ("Accept", "application/json"),
        ("Content-Type", "application/json"),
        ("traceparent", traceparent(index)),
        (KEY_HEADER, user_id(index)),
    ]


def bare_headers(index: int, body: bytes) -> Headers:
    return [
        ("Host", BARE_HOST),
        ("Content-Type", "application/json"),
        (KEY_HEADER, user_id(index)),
        ("Content-Length", str(len(body))),
    ]


def request_parts(shape: str, index: int) -> tuple[Headers, bytes]:
    """The header fields and the body of request ``index`` of ``shape``."""
    if shape == "ingress":
        body = ingress_body(index)
        return ingress_headers(index, body), body
    if shape == "bare":
        return bare_headers(index, BARE_BODY), BARE_BODY
    raise ValueError(f"unknown request shape {shape!r} (choose from {', '.join(SHAPES)})")


def format_request(method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def request(shape: str, index: int, path: str = PATH) -> bytes:
    """Request ``index`` of ``shape`` as bytes on the wire (a POST to ``path``)."""
    headers, body = request_parts(shape, index)
    return format_request("POST", path, headers, body)


def write_requests(path: Path, shape: str, count: int = REQUESTS) -> Path:
    """Pre-format ``count`` requests for bench/post.lua: each is "<length>\\n<bytes>"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        for index in range(count):
            data = request(shape, index)
            out.write(b"%d\n" % len(data))
            out.write(data)
    return path
