"""A real OTLP/HTTP trace receiver for the tests: what a collector sees of the gateway's spans.

``OtlpReceiver`` is an aiohttp server on its own event loop in a background thread, bound to
127.0.0.1 port 0. It accepts ``POST /v1/traces`` with ``Content-Type: application/x-protobuf``
(optionally gzip/deflate encoded), decodes ``ExportTraceServiceRequest`` with the protobuf classes
of ``opentelemetry-proto``, keeps every span as a ``ReceivedSpan`` and answers with an
``ExportTraceServiceResponse``, as the OTLP/HTTP specification says. Anything else is answered
with an error status and remembered in ``problems`` so that a test can assert there were none.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from tests.support import BackgroundAiohttp

PROTOBUF = "application/x-protobuf"
SPAN_KIND_SERVER = Span.SpanKind.SPAN_KIND_SERVER
SPAN_KIND_CLIENT = Span.SpanKind.SPAN_KIND_CLIENT
STATUS_UNSET = Status.StatusCode.STATUS_CODE_UNSET
STATUS_OK = Status.StatusCode.STATUS_CODE_OK
STATUS_ERROR = Status.StatusCode.STATUS_CODE_ERROR


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind)


def attributes_of(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    item: KeyValue
    for item in items:
        out[item.key] = any_value(item.value)
    return out


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    scope: str  # instrumentation scope name
    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    parent_span_id: str  # "" for a root span
    trace_state: str
    name: str
    kind: int  # Span.SpanKind value
    attributes: dict[str, Any]
    status_code: int  # Status.StatusCode value
    start_ns: int
    end_ns: int


class OtlpReceiver:
    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._spans: list[ReceivedSpan] = []
        self.exports = 0  # accepted export requests
        self.content_types: set[str] = set()
        self.problems: list[str] = []  # requests that were not valid OTLP/HTTP protobuf exports
        self._server = BackgroundAiohttp(self._make_app, name="otlp-receiver")

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT is set to (exporters append /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return self.endpoint + "/v1/traces"

    def start(self) -> OtlpReceiver:
        self.port = self._server.start(15)
        return self

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        return app

    def stop(self) -> None:
        self._server.stop()

    # -- the OTLP/HTTP endpoint -----------------------------------------------------------------

    def _problem(self, text: str) -> None:
        with self._changed:
            self.problems.append(text)
            self._changed.notify_all()

    async def _traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        with self._lock:
            self.content_types.add(content_type)
        if content_type != PROTOBUF:
            self._problem(f"unsupported content type {content_type!r}")
            return web.Response(status=415, text="only application/x-protobuf")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"unknown content encoding {encoding!r}")
            export = ExportTraceServiceRequest.FromString(body)
        except (DecodeError, ValueError, OSError, zlib.error) as exc:
            self._problem(f"undecodable export: {exc}")
            return web.Response(status=400, text="bad export request")
        spans = list(self._spans_of(export))
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), headers={"Content-Type": PROTOBUF}
        )

    @staticmethod
    def _spans_of(export: ExportTraceServiceRequest) -> list[ReceivedSpan]:
        out: list[ReceivedSpan] = []
        for resource_spans in export.resource_spans:
            service = str(attributes_of(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    out.append(
                        ReceivedSpan(
                            service=service,
                            scope=scope_spans.scope.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            trace_state=span.trace_state,
                            name=span.name,
                            kind=span.kind,
                            attributes=attributes_of(span.attributes),
                            status_code=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        return out

    # -- what was received ----------------------------------------------------------------------

    def spans(self, predicate: Callable[[ReceivedSpan], bool] = lambda s: True) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans if predicate(s)]

    def wait_for_spans(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 15.0
    ) -> list[ReceivedSpan]:
        """The spans matching ``predicate`` once at least ``count`` arrived; AssertionError if they
        do not arrive within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [s for s in self._spans if predicate(s)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    services = sorted({s.service for s in self._spans})
                    raise AssertionError(
                        f"{len(found)} of {count} expected spans in {timeout}s; received"
                        f" {len(self._spans)} spans from {services}; problems: {self.problems}"
                    )
                self._changed.wait(left)
