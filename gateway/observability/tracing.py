"""OpenTelemetry tracing of proxied requests, paid for only by sampled requests.

The data plane reads the client's W3C ``traceparent`` itself and makes the sampling decision
without the SDK, by the OpenTelemetry specification's rules: parent-based samplers follow the
parent's sampled flag; a ratio decision (``traceidratio``, or a root under
``parentbased_traceidratio``) compares the low 64 bits of the trace id with the ratio's bound, as
the SDK's TraceIdRatioBased does, so every replica decides alike for one trace. Only a sampled
request touches the SDK: a
SERVER span whose context replaces ``traceparent`` toward the upstream, so the upstream's
spans become its children. An unsampled request forwards ``traceparent``/``tracestate``
untouched, so propagation works at the cost of one header comparison.

Tracing is on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and not switched off (``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none``). Service name and resource come from ``OTEL_SERVICE_NAME`` /
``OTEL_RESOURCE_ATTRIBUTES``; the exporter reads the other ``OTEL_EXPORTER_OTLP_*`` variables.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from gateway.config import ConfigError

log = logging.getLogger("shardgate.tracing")

DEFAULT_RATIO = 0.01
_SAMPLERS = {
    # name -> (parent-based, fixed ratio or None to read OTEL_TRACES_SAMPLER_ARG)
    "parentbased_traceidratio": (True, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "traceidratio": (False, None),
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
}
_HEX = frozenset(b"0123456789abcdef")
_LOW_64_BITS = (1 << 64) - 1


def ratio_bound(ratio: float) -> int:
    """TraceIdRatioBased's bound: a trace is sampled when its low 64 bits are below it."""
    return round(ratio * (_LOW_64_BITS + 1))


class ChosenTraceIds:
    """The SDK's id generator (its ``IdGenerator`` interface; not subclassed, so that the data
    plane does not load the SDK when tracing is off): random ids like its default one, except
    a root span's trace id, which the data plane chose when it made the sampling decision on
    it (the SDK would otherwise make up another)."""

    def __init__(self) -> None:
        self.next_trace_id = 0  # set just before a root span is started, used once

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return True


def parse_traceparent(value: bytes) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a version-00 traceparent, or None if invalid."""
    value = value.strip()
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version, trace_hex, span_hex, flags_hex = value[:2], value[3:35], value[36:52], value[53:55]
    if version == b"ff" or not _HEX.issuperset(trace_hex + span_hex + flags_hex + version):
        return None
    if version == b"00" and len(value) != 55:
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags_hex, 16) & 1)


class Tracing:
    """Sampling decisions and span lifecycle for the data plane."""

    def __init__(
        self,
        tracer: Any,
        ratio: float,
        parent_based: bool,
        provider: Any = None,
        ids: ChosenTraceIds | None = None,
    ) -> None:
        self._tracer = tracer
        self.provider = provider  # the SDK TracerProvider, flushed at shutdown
        self._ids = ids or ChosenTraceIds()  # the provider's id generator
        self.ratio = ratio
        self._bound = ratio_bound(ratio)
        self.parent_based = parent_based
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
        from opentelemetry.trace.span import TraceFlags, TraceState

        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._trace_flags = TraceFlags
        self._trace_state = TraceState

    def sampled_trace_id(self, parent: tuple[int, int, bool] | None) -> int:
        """The trace id of the span to start for this request, or 0 when it is not sampled.

        With a parent the trace is the parent's: followed by parent-based samplers, decided on
        its id otherwise. A root gets a new trace id, and the ratio decides on that id."""
        if parent is not None:
            if self.parent_based:
                return parent[0] if parent[2] else 0
            trace_id = parent[0]
        else:
            trace_id = random.getrandbits(128) or 1
        return trace_id if trace_id & _LOW_64_BITS < self._bound else 0

    def start(
        self,
        parent: tuple[int, int, bool] | None,
        trace_id: int,
        tracestate: bytes | None,
        method: bytes,
        target: bytes,
        attributes: dict[str, Any],
    ) -> tuple[Any, bytes]:
        """Start a SERVER span in trace ``trace_id`` (from ``sampled_trace_id``); return it and
        the traceparent to send upstream."""
        context = None
        if parent is None:
            self._ids.next_trace_id = trace_id
        else:
            state = self._trace_state.from_header([tracestate.decode("latin-1")]) if tracestate else None
            remote = self._span_context(
                trace_id=parent[0],
                span_id=parent[1],
                is_remote=True,
                trace_flags=self._trace_flags(self._trace_flags.SAMPLED if parent[2] else 0),
                trace_state=state,
            )
            context = self._trace.set_span_in_context(self._non_recording(remote))
        path = target.split(b"?", 1)[0].decode("latin-1")
        method_text = method.decode("latin-1")
        attributes["http.request.method"] = method_text
        attributes["url.path"] = path
        span = self._tracer.start_span(
            method_text, context=context, kind=self._server, attributes=attributes, start_time=time.time_ns()
        )
        span_context = span.get_span_context()
        header = b"00-%032x-%016x-01" % (span_context.trace_id, span_context.span_id)
        return span, header

    def finish(self, span: Any, status: int, attributes: dict[str, Any]) -> None:
        attributes["http.response.status_code"] = status
        span.set_attributes(attributes)
        if status >= 500:
            span.set_status(self._error)
        span.end()


class TracingOptions:
    """What the standard OTEL_* variables ask for (checked, the SDK not loaded yet)."""

    __slots__ = ("exporter", "parent_based", "ratio", "sampler")

    def __init__(self, exporter: str, sampler: str, ratio: float, parent_based: bool) -> None:
        self.exporter = exporter
        self.sampler = sampler
        self.ratio = ratio
        self.parent_based = parent_based


def tracing_from_env(env: Mapping[str, str]) -> Tracing | None:
    """The configured tracer, or None when tracing is off (then it costs nothing per request)."""
    options = tracing_options(env)
    if options is None:
        return None
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if options.exporter == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_EXPORTER_OTLP_*
    log.info(
        "tracing on: exporter %s, sampler %s, ratio %s", options.exporter, options.sampler, options.ratio
    )
    service = env.get("OTEL_SERVICE_NAME") or "shardgate"
    return build_tracing(exporter, service, options.ratio, options.parent_based)


def tracing_options(env: Mapping[str, str]) -> TracingOptions | None:
    """The OTEL_* variables, checked (ConfigError naming the variable); None: tracing is off."""
    if (env.get("OTEL_SDK_DISABLED") or "").strip().lower() == "true":
        return None
    exporter_name = (env.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or (exporter_name == "otlp" and not endpoint):
        return None
    if exporter_name not in ("otlp", "console"):
        raise ConfigError([f"OTEL_TRACES_EXPORTER: {exporter_name!r} is not otlp, console or none"])
    sampler_name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_traceidratio").strip().lower()
    if sampler_name not in _SAMPLERS:
        raise ConfigError([f"OTEL_TRACES_SAMPLER: {sampler_name!r} is not one of {', '.join(_SAMPLERS)}"])
    parent_based, ratio = _SAMPLERS[sampler_name]
    if ratio is None:
        raw = env.get("OTEL_TRACES_SAMPLER_ARG") or str(DEFAULT_RATIO)
        try:
            ratio = float(raw)
        except ValueError:
            raise ConfigError([f"OTEL_TRACES_SAMPLER_ARG: {raw!r} is not a number"]) from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError([f"OTEL_TRACES_SAMPLER_ARG: {ratio} is not between 0 and 1"])
    return TracingOptions(exporter_name, sampler_name, ratio, parent_based)


def build_tracing(exporter: Any, service_name: str, ratio: float, parent_based: bool) -> Tracing:
    """A ``Tracing`` exporting through ``exporter`` (an SDK SpanExporter) in batches."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    # The data plane has decided already; the SDK records whatever it is asked to start.
    ids = ChosenTraceIds()
    resource = Resource.create({"service.name": service_name})
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=ids)  # type: ignore[arg-type]
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer("shardgate"), ratio, parent_based, provider, ids)


def shutdown(tracing: Tracing | None) -> None:
    """Flush spans still queued in the batch processor."""
    if tracing is not None and tracing.provider is not None:
        tracing.provider.shutdown()
