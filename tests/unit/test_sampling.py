"""Sampling decisions follow the OpenTelemetry specification: a ratio decides on the trace id
(its low 64 bits, as the SDK's TraceIdRatioBased does), so every replica decides alike for one
trace; parent-based samplers follow the parent's sampled flag."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from gateway.observability.tracing import Tracing, build_tracing, parse_traceparent

RATIO = 0.25


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def tracing(exporter: InMemorySpanExporter, parent_based: bool, ratio: float = RATIO) -> Tracing:
    return build_tracing(exporter, "test", ratio, parent_based)


def trace_ids(count: int, seed: int = 7) -> Iterator[int]:
    rng = random.Random(seed)
    return (rng.getrandbits(128) or 1 for _ in range(count))


def sdk_samples(trace_id: int, ratio: float = RATIO) -> bool:
    return TraceIdRatioBased(ratio).should_sample(None, trace_id, "x").decision.is_sampled()


def test_traceidratio_decides_on_the_parents_trace_id_as_the_sdk_does(exporter: InMemorySpanExporter) -> None:
    one, other = tracing(exporter, parent_based=False), tracing(InMemorySpanExporter(), parent_based=False)
    decisions = []
    for trace_id in trace_ids(2000):
        for flag in (True, False):  # not parent-based: the parent's flag does not matter
            parent = (trace_id, 1, flag)
            chosen = one.sampled_trace_id(parent)
            assert chosen in (0, trace_id)
            assert bool(chosen) is sdk_samples(trace_id)
            assert other.sampled_trace_id(parent) == chosen  # another replica: the same choice
            decisions.append(bool(chosen))
    assert 0.15 < sum(decisions) / len(decisions) < 0.35  # the ratio, roughly (n = 4000)


def test_parent_based_follows_the_parents_flag(exporter: InMemorySpanExporter) -> None:
    sampler = tracing(exporter, parent_based=True, ratio=0.0)
    for trace_id in trace_ids(200):
        assert sampler.sampled_trace_id((trace_id, 1, True)) == trace_id
        assert sampler.sampled_trace_id((trace_id, 1, False)) == 0


def test_a_sampled_root_is_traced_with_the_trace_id_it_was_decided_on(exporter: InMemorySpanExporter) -> None:
    sampler = tracing(exporter, parent_based=True)
    chosen = [t for t in (sampler.sampled_trace_id(None) for _ in range(4000)) if t]
    assert 0.15 < len(chosen) / 4000 < 0.35
    assert all(sdk_samples(t) for t in chosen)  # a downstream ratio sampler agrees with us
    span, header = sampler.start(None, chosen[0], None, b"GET", b"/x?y", {})
    sampler.finish(span, 200, {})
    assert span.get_span_context().trace_id == chosen[0]
    parsed = parse_traceparent(header)
    assert parsed is not None and parsed[0] == chosen[0] and parsed[2]
    assert sampler.provider is not None
    sampler.provider.force_flush()
    assert [s.context.trace_id for s in exporter.get_finished_spans()] == [chosen[0]]
    sampler.provider.shutdown()


def test_ratio_zero_and_one(exporter: InMemorySpanExporter) -> None:
    never, always = tracing(exporter, False, 0.0), tracing(InMemorySpanExporter(), False, 1.0)
    for trace_id in trace_ids(500):
        assert never.sampled_trace_id((trace_id, 1, True)) == 0
        assert always.sampled_trace_id((trace_id, 1, False)) == trace_id
        assert never.sampled_trace_id(None) == 0
        assert always.sampled_trace_id(None) != 0
