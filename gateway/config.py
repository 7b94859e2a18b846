"""The shard config (the YAML contract).

The shard config is validated with pydantic v2; every problem is reported as one line
``field.path: reason`` so that an operator can find it in a ConfigMap at a glance. Process
settings (flags and SHARDGATE_* variables) are in ``gateway.settings``.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# The data plane imports its Limits from here (gateway/proxy); they live in gateway.limits.
from gateway.limits import Limits as Limits

# RFC 9110 token characters: what a method or a header field name may contain.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?\Z")
_PORT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?\Z")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?)\Z")


class ConfigError(Exception):
    """A shard config that cannot be used; ``problems`` holds one ``path: reason`` per issue."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _check_token(value: str, what: str) -> str:
    if not _TOKEN_RE.match(value):
        raise ValueError(f"{value!r} is not a valid {what} (RFC 9110 token characters only)")
    return value


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 in brackets); raise ValueError with a readable reason."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    if not _HOST_RE.match(host):
        raise ValueError(f"{value!r} has an invalid host {host!r}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{value!r} has an invalid IPv6 address {host!r}") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r} has an invalid port {port_text!r} (1-65535)")
    return host.strip("[]"), int(port_text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoutingConfig(_Strict):
    key_header: str = "User-ID"
    # Sorted, as the validator normalises an explicit list: equal configs, equal epochs.
    write_methods: tuple[str, ...] = ("DELETE", "PATCH", "POST", "PUT")
    operation_header: str | None = "Operation-Type"
    missing_key: Literal["reject"] = "reject"
    reads: Literal["any", "owner", "owner-preferred"] = "any"

    @field_validator("key_header", "operation_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        return None if value is None else _check_token(value, "header name")

    @field_validator("write_methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one write method is required")
        for method in value:
            _check_token(method, "method name")
            if method != method.upper():
                raise ValueError(f"method {method!r} must be upper case")
        return tuple(sorted(set(value)))


class RingConfig(_Strict):
    vnodes: Annotated[int, Field(ge=1, le=4096, strict=True)] = 160


class PassiveHealthConfig(_Strict):
    """Outlier ejection from what requests meet (docs/contract.md "Health"): a connect failure,
    reset or timeout ejects a pod; so does a run of ``consecutive_5xx`` 5xx answers, but never
    the group's last usable pod. An ejection lasts ``base_ejection`` seconds times the pod's
    ejections so far, up to ``max_ejection``, plus up to 10% jitter; then one trial request."""

    enabled: bool = True  # false: no pod is ever ejected (every request meets what it meets)
    consecutive_5xx: Annotated[int, Field(ge=1, le=1000, strict=True)] = 5
    base_ejection: Annotated[float, Field(gt=0, le=3600)] = 30.0
    max_ejection: Annotated[float, Field(gt=0, le=86400)] = 300.0

    @model_validator(mode="after")
    def _cap_above_base(self) -> PassiveHealthConfig:
        if self.max_ejection < self.base_ejection:
            raise ValueError("max_ejection must be at least base_ejection")
        return self


class PassiveHealthOverride(_Strict):
    """A group's changes to the passive health settings (the rest comes from ``health``)."""

    enabled: bool | None = None
    consecutive_5xx: Annotated[int, Field(ge=1, le=1000, strict=True)] | None = None
    base_ejection: Annotated[float, Field(gt=0, le=3600)] | None = None
    max_ejection: Annotated[float, Field(gt=0, le=86400)] | None = None


class HealthConfig(_Strict):
    passive: PassiveHealthConfig = PassiveHealthConfig()


class GroupHealthConfig(_Strict):
    passive: PassiveHealthOverride = PassiveHealthOverride()


class BucketConfig(_Strict):
    """A token bucket: ``rate`` requests per second on average, ``burst`` at once."""

    rate: Annotated[float, Field(gt=0, le=10_000_000)]
    burst: Annotated[int, Field(ge=1, le=100_000_000, strict=True)] | None = None  # None: rate, rounded up

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class RateLimitsConfig(_Strict):
    """Token buckets (docs/contract.md "Rate limits"): a request takes a token from each bucket
    that applies to it (global; its key's owner group; its key), or is answered 429."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)

    per_key: BucketConfig | None = None
    per_group: BucketConfig | None = None
    global_: BucketConfig | None = Field(default=None, alias="global")
    # The per-key buckets, kept at most this many (least recently used forgotten first: a
    # forgotten bucket is a full one).
    max_keys: Annotated[int, Field(ge=100, le=10_000_000, strict=True)] = 100_000
    redis_url: str | None = None  # the per-key buckets in Redis, exact across replicas
    # A Redis answer not back in this long: the local bucket decides (fail open).
    redis_timeout: Annotated[float, Field(gt=0, le=5)] = 0.05

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{value!r} is not a Redis URL (redis://, rediss:// or unix://)")
        return value

    @model_validator(mode="after")
    def _redis_needs_keys(self) -> RateLimitsConfig:
        if self.redis_url is not None and self.per_key is None:
            raise ValueError("redis_url keeps the per-key buckets: it needs per_key")
        return self


class GroupConfig(_Strict):
    name: str
    weight: Annotated[int, Field(ge=1, le=1000, strict=True)] = 1
    service: str | None = None
    port: int | str | None = None
    endpoints: tuple[str, ...] | None = None
    health: GroupHealthConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _GROUP_NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid group name (1-63 letters, digits, '.', '_', '-';"
                " starting and ending alphanumeric)"
            )
        return value

    @field_validator("service")
    @classmethod
    def _service(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL_RE.match(value):
            raise ValueError(f"{value!r} is not a valid Service name (DNS-1035 label)")
        return value

    @field_validator("port")
    @classmethod
    def _port(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, bool):
            raise ValueError("port must be a number or a port name, not a boolean")
        if isinstance(value, int) and not 1 <= value <= 65535:
            raise ValueError(f"port {value} is out of range (1-65535)")
        if isinstance(value, str) and not _PORT_NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid port name (IANA_SVC_NAME)")
        return value

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("endpoints must list at least one host:port")
        for item in value:
            parse_host_port(item)
        if len(set(value)) != len(value):
            raise ValueError("endpoints must not repeat an address")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> GroupConfig:
        if (self.service is None) == (self.endpoints is None):
            raise ValueError("a group needs exactly one of 'service' or 'endpoints'")
        if self.endpoints is not None and self.port is not None:
            raise ValueError("'port' belongs to 'service' groups; endpoints carry their own ports")
        return self

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        return tuple(parse_host_port(item) for item in self.endpoints or ())


# Added to a lease before a silent party counts as stopped: clock-rate drift between the leader
# and the party (1%) and the time a read takes to reach the API server.
LEASE_MARGIN_SECONDS = 2.0
LEASE_DRIFT = 0.01


def lease_margin(lease: float) -> float:
    return LEASE_MARGIN_SECONDS + LEASE_DRIFT * lease


class HandoffConfig(_Strict):
    """How a config change that moves keys is carried out (docs/design/014-ownership-handoff.md)."""

    # fenced: drop-before-add with a barrier; immediate: switch at once (no guarantee across
    # replicas: for comparison and for fleets whose backends have no fence).
    mode: Literal["fenced", "immediate"] = "fenced"
    # A fence that could not confirm its view of the shard state for this long refuses writes.
    # Well above the API-server outages the gateway rides out (10 s), so those cost nothing.
    fence_lease_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # A barrier not reached in this long rolls the hand-off back. A participant nobody can reach
    # counts as stopped two leases after the fence phase began (one for its view to run out, one
    # for the writes it accepted just before to finish), so the timeout must be above that.
    barrier_timeout_seconds: Annotated[float, Field(gt=0, le=7200)] = 180.0
    # A write for a moving key waits this long at a gateway for the hand-off to end, then gets
    # 503 shard_moving.
    hold_seconds: Annotated[float, Field(ge=0, le=60)] = 2.0

    @model_validator(mode="after")
    def _timeout_above_two_leases(self) -> HandoffConfig:
        silent = 2 * self.fence_lease_seconds + lease_margin(self.fence_lease_seconds)
        if self.barrier_timeout_seconds <= silent:
            raise ValueError(
                f"barrier_timeout_seconds must be above {silent:g} (twice fence_lease_seconds + 2 s"
                " + 1% of it): a pod that cannot be reached counts as stopped only then"
            )
        return self


class ShardConfig(_Strict):
    version: Literal[1]
    routing: RoutingConfig = RoutingConfig()
    ring: RingConfig = RingConfig()
    handoff: HandoffConfig = HandoffConfig()
    # None (left out): the defaults, and an epoch the same as before the section existed.
    health: HealthConfig | None = None
    limits: RateLimitsConfig | None = None  # None: no rate limits
    groups: tuple[GroupConfig, ...]

    def passive_health(self, group: GroupConfig) -> PassiveHealthConfig:
        """The passive health settings of ``group``: its own changes over the config's."""
        base = self.health.passive if self.health is not None else PassiveHealthConfig()
        override = group.health.passive if group.health is not None else None
        if override is None:
            return base
        changes = override.model_dump(exclude_none=True)
        try:
            return PassiveHealthConfig.model_validate({**base.model_dump(), **changes})
        except ValidationError as exc:  # (checked at load: see _group_health)
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"group {group.name!r}: health.passive: {reason}") from exc

    @model_validator(mode="after")
    def _group_health(self) -> ShardConfig:
        for group in self.groups:
            self.passive_health(group)  # a group's changes must make valid settings with the rest
        return self

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
        if not value:
            raise ValueError("at least one group is required")
        seen: set[str] = set()
        owners: dict[str, str] = {}
        for group in value:
            if group.name in seen:
                raise ValueError(f"group name {group.name!r} is used more than once")
            seen.add(group.name)
            for endpoint in group.endpoints or ():
                # One pod in two groups would take writes for both: the conflict we prevent.
                if endpoint in owners:
                    raise ValueError(
                        f"endpoint {endpoint} is in both {owners[endpoint]!r} and {group.name!r}"
                    )
                owners[endpoint] = group.name
        return value


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(document)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{path}: {message}")
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_shard_config(text: str | bytes) -> ShardConfig:
    """Parse and validate one shards.yaml document; raise ConfigError with every problem."""
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {reason}"]) from None
    if not isinstance(document, Mapping):
        raise ConfigError(["(document): the shard config must be a YAML mapping"])
    try:
        return ShardConfig.model_validate(document)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_shard_config(path: str) -> ShardConfig:
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return parse_shard_config(text)


def normalized_config(config: ShardConfig) -> dict[str, object]:
    """The canonical form the epoch digest is computed over (defaults filled, order kept)."""
    return config.model_dump(mode="json", exclude_none=True)
