"""OpenTelemetry tracing of proxied requests, seen from a real OTLP/HTTP receiver.

The gateway runs as operators run it, with ``OTEL_*`` variables only; its spans go over OTLP/HTTP
(protobuf) to ``OtlpReceiver``. The upstream pods are real servers that trace too: each extracts
the W3C context it receives with the SDK's ``TraceContextTextMapPropagator`` and exports its own
SERVER span to the same receiver, so the tests see the whole trace a collector would see: the
gateway's span, and the upstream's span as its child.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.integration.conftest import (
    KEY_HEADER,
    NO_EJECTION,
    Gateway,
    GatewayFactory,
    GroupSpec,
    Recipe,
    UpstreamFactory,
    group_of,
    http_request,
)
from tests.observability.otlp_receiver import (
    PROTOBUF,
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
)
from tests.support import BackgroundAiohttp

pytestmark = pytest.mark.timeout(60)

GATEWAY_SERVICE = "shardgate-test"
RATIO0_SERVICE = "shardgate-test-ratio0"
UPSTREAM_SERVICE = "shardgate-test-upstream"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


# ---------------------------------------------------------------------------------------------
# An upstream pod that traces itself


@dataclass(frozen=True)
class Seen:
    """What a traced upstream received."""

    method: str
    path: str
    request_id: str
    traceparent: list[str]
    tracestate: list[str]


class TracedUpstream:
    """An aiohttp pod on its own event loop thread. Every request gets a SERVER span whose parent
    is extracted from the request's ``traceparent``/``tracestate`` (W3C), exported synchronously
    (before the response is sent) to the receiver."""

    def __init__(self, group: str, pod: str, tracer: Tracer) -> None:
        self.group = group
        self.pod = pod
        self.port = 0
        self._tracer = tracer
        self._propagator = TraceContextTextMapPropagator()
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._server = BackgroundAiohttp(self._make_app, name=pod)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def seen_with(self, request_id: str) -> Seen:
        found = [s for s in self.seen() if s.request_id == request_id]
        assert len(found) == 1, (request_id, found)
        return found[0]

    async def _handle(self, request: web.Request) -> web.Response:
        carrier = {name.lower(): value for name, value in request.headers.items()}
        context = self._propagator.extract(carrier)
        await request.read()
        request_id = request.headers.get("X-Request-ID", "")
        with self._tracer.start_as_current_span(
            f"{request.method} {request.path}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"upstream.pod": self.pod, "upstream.request_id": request_id},
        ):
            seen = Seen(
                request.method,
                request.path,
                request_id,
                request.headers.getall("traceparent", []),
                request.headers.getall("tracestate", []),
            )
        with self._lock:
            self._seen.append(seen)
        return web.json_response({"group": self.group, "pod": self.pod, "address": self.address})

    def start(self) -> TracedUpstream:
        self.port = self._server.start(15)
        return self

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def stop(self) -> None:
        self._server.stop()


# ---------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class Setup:
    receiver: OtlpReceiver
    pods: dict[str, TracedUpstream]  # pod name -> server
    groups: list[GroupSpec]
    recipe: Recipe
    dead_address: str

    def pod_at(self, address: str) -> TracedUpstream:
        found = [p for p in self.pods.values() if p.address == address]
        assert len(found) == 1, address
        return found[0]


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def setup(receiver: OtlpReceiver, module_upstreams: UpstreamFactory) -> Iterator[Setup]:
    provider = TracerProvider(
        resource=Resource.create({"service.name": UPSTREAM_SERVICE}), sampler=ParentBased(ALWAYS_ON)
    )
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_url)))
    tracer = provider.get_tracer("tests.observability.upstream")
    pods = {
        name: TracedUpstream(group, name, tracer).start()
        for group, name in (("t-1", "t-1-a"), ("t-1", "t-1-b"), ("t-2", "t-2-a"))
    }
    dead = module_upstreams.dead_port()
    groups = [
        group_of("t-1", [pods["t-1-a"].address, pods["t-1-b"].address]),
        group_of("t-2", [pods["t-2-a"].address]),
        group_of("t-dead", [dead]),
    ]
    try:
        yield Setup(receiver, pods, groups, Recipe(groups), dead.address)
    finally:
        for pod in pods.values():
            pod.stop()
        provider.shutdown()


def _otel_env(receiver: OtlpReceiver, service: str, ratio: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_SAMPLER_ARG": ratio,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def traced(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    """Tracing on, every root request sampled."""
    return module_gateway(
        setup.groups, env=_otel_env(setup.receiver, GATEWAY_SERVICE, "1"), health=NO_EJECTION
    )


@pytest.fixture(scope="module")
def ratio0(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    """Tracing on, roots never sampled (a sampled client parent still is: parent-based)."""
    return module_gateway(
        setup.groups, env=_otel_env(setup.receiver, RATIO0_SERVICE, "0"), health=NO_EJECTION
    )


@pytest.fixture(scope="module")
def untraced(module_gateway: GatewayFactory, setup: Setup) -> Gateway:
    """No OTLP endpoint configured: tracing is off."""
    return module_gateway(setup.groups, health=NO_EJECTION)


# ---------------------------------------------------------------------------------------------
# Helpers


def new_request_id() -> str:
    return "obs-" + uuid.uuid4().hex


def new_traceparent(sampled: bool) -> tuple[str, str, str]:
    """(header, trace id, span id) of a fresh client context."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def gateway_span(setup: Setup, service: str, request_id: str) -> ReceivedSpan:
    spans = setup.receiver.wait_for_spans(
        lambda s: s.service == service and s.attributes.get("shardgate.request_id") == request_id
    )
    assert len(spans) == 1, spans
    return spans[0]


def upstream_span(setup: Setup, request_id: str) -> ReceivedSpan:
    spans = setup.receiver.wait_for_spans(
        lambda s: s.service == UPSTREAM_SERVICE and s.attributes.get("upstream.request_id") == request_id
    )
    assert len(spans) == 1, spans
    return spans[0]


def assert_receiver_clean(receiver: OtlpReceiver) -> None:
    assert receiver.problems == [], receiver.problems
    assert receiver.content_types == {PROTOBUF}, receiver.content_types


# ---------------------------------------------------------------------------------------------
# Tests


def test_write_gets_a_server_span_and_the_upstream_span_is_its_child(traced: Gateway, setup: Setup) -> None:
    key = setup.recipe.keys_owned_by("t-1", 1, prefix="trace-write")[0]
    rid = new_request_id()
    result = http_request(
        traced.port, "POST", "/orders?debug=1", {KEY_HEADER: key, "X-Request-ID": rid}, b"{}"
    )
    assert result.status == 200, result.body
    served = setup.pod_at(result.json()["address"])

    span = gateway_span(setup, GATEWAY_SERVICE, rid)
    assert span.kind == SPAN_KIND_SERVER
    assert span.parent_span_id == "", "no client context: the gateway span is a root"
    assert span.status_code != STATUS_ERROR
    attrs = span.attributes
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/orders"
    assert attrs["http.response.status_code"] == 200
    assert attrs["shardgate.group"] == setup.recipe.owner(key) == "t-1"
    assert attrs["shardgate.pod"] == served.address
    assert attrs["shardgate.epoch"] == traced.epoch()
    assert attrs["shardgate.kind"] == "write"

    # The upstream got the gateway span's context, and its own span is the gateway span's child.
    seen = served.seen_with(rid)
    assert seen.traceparent == [f"00-{span.trace_id}-{span.span_id}-01"]
    child = upstream_span(setup, rid)
    assert child.trace_id == span.trace_id
    assert child.parent_span_id == span.span_id
    assert_receiver_clean(setup.receiver)


def test_read_span_names_the_serving_pods_group(traced: Gateway, setup: Setup) -> None:
    rid = new_request_id()
    result = http_request(traced.port, "GET", "/catalog/7", {"X-Request-ID": rid})
    assert result.status == 200, result.body
    served = setup.pod_at(result.json()["address"])
    span = gateway_span(setup, GATEWAY_SERVICE, rid)
    assert span.attributes["shardgate.kind"] == "read"
    assert span.attributes["http.request.method"] == "GET"
    assert span.attributes["url.path"] == "/catalog/7"
    assert span.attributes["shardgate.group"] == served.group
    assert span.attributes["shardgate.pod"] == served.address
    assert upstream_span(setup, rid).parent_span_id == span.span_id


def test_a_502_span_has_error_status(traced: Gateway, setup: Setup) -> None:
    key = setup.recipe.keys_owned_by("t-dead", 1, prefix="trace-dead")[0]
    rid = new_request_id()
    result = http_request(traced.port, "POST", "/orders", {KEY_HEADER: key, "X-Request-ID": rid}, b"{}")
    assert result.status == 502, result.body
    span = gateway_span(setup, GATEWAY_SERVICE, rid)
    assert span.status_code == STATUS_ERROR
    assert span.attributes["http.response.status_code"] == 502
    assert span.attributes["shardgate.group"] == "t-dead"
    assert span.attributes["shardgate.pod"] == setup.dead_address
    assert span.attributes["shardgate.kind"] == "write"


def test_sampled_client_traceparent_is_the_gateway_spans_parent(traced: Gateway, setup: Setup) -> None:
    header, trace_id, client_span = new_traceparent(sampled=True)
    key = setup.recipe.keys_owned_by("t-2", 1, prefix="trace-client")[0]
    rid = new_request_id()
    result = http_request(
        traced.port,
        "PUT",
        "/orders/1",
        {KEY_HEADER: key, "X-Request-ID": rid, "traceparent": header, "tracestate": TRACESTATE},
        b"{}",
    )
    assert result.status == 200, result.body
    span = gateway_span(setup, GATEWAY_SERVICE, rid)
    assert span.trace_id == trace_id
    assert span.parent_span_id == client_span
    assert span.span_id != client_span
    seen = setup.pods["t-2-a"].seen_with(rid)
    assert seen.traceparent == [f"00-{trace_id}-{span.span_id}-01"]
    assert seen.tracestate == [TRACESTATE], "tracestate is forwarded unchanged"
    child = upstream_span(setup, rid)
    assert (child.trace_id, child.parent_span_id) == (trace_id, span.span_id)


def test_unsampled_client_traceparent_makes_no_span_and_is_forwarded_unchanged(
    traced: Gateway, setup: Setup
) -> None:
    header, trace_id, _ = new_traceparent(sampled=False)
    key = setup.recipe.keys_owned_by("t-2", 1, prefix="trace-unsampled")[0]
    rid = new_request_id()
    result = http_request(
        traced.port,
        "POST",
        "/orders",
        {KEY_HEADER: key, "X-Request-ID": rid, "traceparent": header, "tracestate": TRACESTATE},
        b"{}",
    )
    assert result.status == 200, result.body
    seen = setup.pods["t-2-a"].seen_with(rid)
    assert seen.traceparent == [header]
    assert seen.tracestate == [TRACESTATE]
    # A sampled request answered afterwards: once its span is in, any span of the unsampled one
    # (ended earlier, exported in order by the batch processor) would be in too.
    marker = new_request_id()
    assert http_request(traced.port, "GET", "/marker", {"X-Request-ID": marker}).status == 200
    gateway_span(setup, GATEWAY_SERVICE, marker)
    assert setup.receiver.spans(lambda s: s.trace_id == trace_id) == []
    assert setup.receiver.spans(lambda s: s.attributes.get("shardgate.request_id") == rid) == []


def test_tracing_off_forwards_client_trace_context_unchanged(untraced: Gateway, setup: Setup) -> None:
    header, _, _ = new_traceparent(sampled=True)
    key = setup.recipe.keys_owned_by("t-2", 1, prefix="trace-off")[0]
    rid = new_request_id()
    headers = {KEY_HEADER: key, "X-Request-ID": rid, "traceparent": header, "tracestate": TRACESTATE}
    assert http_request(untraced.port, "POST", "/orders", headers, b"{}").status == 200
    seen = setup.pods["t-2-a"].seen_with(rid)
    assert seen.traceparent == [header]
    assert seen.tracestate == [TRACESTATE]
    # Without client context, the untraced gateway invents none.
    rid2 = new_request_id()
    assert (
        http_request(untraced.port, "POST", "/orders", {KEY_HEADER: key, "X-Request-ID": rid2}, b"{}").status
        == 200
    )
    assert setup.pods["t-2-a"].seen_with(rid2).traceparent == []


def test_ratio_zero_samples_no_root_but_follows_a_sampled_parent(ratio0: Gateway, setup: Setup) -> None:
    key = setup.recipe.keys_owned_by("t-2", 1, prefix="trace-ratio0")[0]
    ids = [new_request_id() for _ in range(5)]
    for rid in ids:
        assert (
            http_request(ratio0.port, "POST", "/orders", {KEY_HEADER: key, "X-Request-ID": rid}, b"{}").status
            == 200
        )
        assert setup.pods["t-2-a"].seen_with(rid).traceparent == [], "an unsampled root sends no traceparent"
    header, trace_id, client_span = new_traceparent(sampled=True)
    marker = new_request_id()
    result = http_request(
        ratio0.port,
        "POST",
        "/orders",
        {KEY_HEADER: key, "X-Request-ID": marker, "traceparent": header},
        b"{}",
    )
    assert result.status == 200
    span = gateway_span(setup, RATIO0_SERVICE, marker)
    assert (span.trace_id, span.parent_span_id) == (trace_id, client_span)
    assert setup.receiver.spans(lambda s: s.service == RATIO0_SERVICE) == [span]
    assert_receiver_clean(setup.receiver)
