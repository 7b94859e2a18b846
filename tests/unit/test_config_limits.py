"""The ``limits`` section of the shard config (docs/contract.md "Rate limits"): optional, with
field paths for every bad value, and no change to the epoch of a config without it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from gateway.config import normalized_config, parse_shard_config
from gateway.ring import config_epoch
from tests.unit.test_config import document, only_problem


def with_limits(limits: Any) -> dict[str, Any]:
    doc = document()
    doc["limits"] = limits
    return doc


def test_the_issue_s_limits_section_is_read_as_written() -> None:
    config = parse_shard_config(
        yaml.safe_dump(
            with_limits(
                {
                    "per_key": {"rate": 10, "burst": 20},
                    "per_group": {"rate": 2000, "burst": 4000},
                    "global": {"rate": 10000, "burst": 20000},
                    "redis_url": "redis://redis.shards:6379/0",
                }
            )
        )
    )
    limits = config.limits
    assert limits is not None and limits.per_key is not None and limits.global_ is not None
    assert (limits.per_key.rate, limits.per_key.capacity, limits.global_.capacity) == (10.0, 20, 20000)
    assert (limits.max_keys, limits.redis_timeout) == (100_000, 0.05)
    # Written out under its own name (workers read the config back from this form).
    assert normalized_config(config)["limits"]["global"] == {"rate": 10000.0, "burst": 20000}  # type: ignore[index]
    assert parse_shard_config(yaml.safe_dump(normalized_config(config))) == config


def test_a_burst_left_out_is_one_second_of_the_rate() -> None:
    config = parse_shard_config(yaml.safe_dump(with_limits({"per_key": {"rate": 2.5}})))
    assert config.limits is not None and config.limits.per_key is not None
    assert config.limits.per_key.capacity == 3


def test_no_limits_section_no_limits_and_the_epoch_of_before() -> None:
    plain = parse_shard_config(yaml.safe_dump(document()))
    assert plain.limits is None
    assert "limits" not in normalized_config(plain)
    limited = parse_shard_config(yaml.safe_dump(with_limits({"global": {"rate": 1}})))
    assert config_epoch(plain) != config_epoch(limited)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"per_key": {"rate": 0}}, "limits.per_key.rate:"),
        ({"global": {"rate": 1, "burst": 0}}, "limits.global.burst:"),
        ({"per_group": {"burst": 5}}, "limits.per_group.rate: Field required"),
        ({"per_key": {"rate": 1}, "redis_url": "http://redis"}, "limits.redis_url:"),
        ({"redis_url": "redis://redis:6379/0"}, "limits: redis_url keeps the per-key buckets"),
        ({"per_key": {"rate": 1}, "max_keys": 5}, "limits.max_keys:"),
        ({"per_user": {"rate": 1}}, "limits.per_user:"),
    ],
    ids=["zero-rate", "zero-burst", "no-rate", "bad-url", "redis-without-per-key", "few-keys", "unknown"],
)
def test_bad_limits_are_reported_with_their_path(limits: dict[str, Any], expected: str) -> None:
    assert expected in only_problem(with_limits(limits))
