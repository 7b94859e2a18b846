"""Shard config (the YAML contract) and process settings (flags + environment).

The shard config is validated with pydantic v2; every problem is reported as one line
``field.path: reason`` so that an operator can find it in a ConfigMap at a glance.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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


class GroupConfig(_Strict):
    name: str
    weight: Annotated[int, Field(ge=1, le=1000, strict=True)] = 1
    service: str | None = None
    port: int | str | None = None
    endpoints: tuple[str, ...] | None = None

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


class ShardConfig(_Strict):
    version: Literal[1]
    routing: RoutingConfig = RoutingConfig()
    ring: RingConfig = RingConfig()
    groups: tuple[GroupConfig, ...]

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
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
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


# ---------------------------------------------------------------------------------------------
# Process settings


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError([f"{name}: {raw!r} is not a number"]) from None
    if value < 0:
        raise ConfigError([f"{name}: must not be negative"])
    return value


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError([f"{name}: {raw!r} is not a non-negative integer"])
    return int(raw)


@dataclass(frozen=True)
class Limits:
    """Data-plane limits and timeouts (seconds); each has a SHARDGATE_* variable."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 2.0
    upstream_header_timeout: float = 30.0
    client_header_timeout: float = 10.0
    client_idle_timeout: float = 60.0
    # Below the keep-alive timeout of common app servers (uvicorn 5 s, Node 5 s), so that the
    # gateway, not the upstream, usually closes an idle connection.
    upstream_idle_timeout: float = 4.0
    max_idle_per_pod: int = 64

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Limits:
        base = cls()
        return cls(
            max_header_bytes=_env_int(env, "SHARDGATE_MAX_HEADER_BYTES", base.max_header_bytes),
            max_body_bytes=_env_int(env, "SHARDGATE_MAX_BODY_BYTES", base.max_body_bytes),
            connect_timeout=_env_float(env, "SHARDGATE_CONNECT_TIMEOUT", base.connect_timeout),
            upstream_header_timeout=_env_float(
                env, "SHARDGATE_UPSTREAM_TIMEOUT", base.upstream_header_timeout
            ),
            client_header_timeout=_env_float(
                env, "SHARDGATE_CLIENT_HEADER_TIMEOUT", base.client_header_timeout
            ),
            client_idle_timeout=_env_float(env, "SHARDGATE_CLIENT_IDLE_TIMEOUT", base.client_idle_timeout),
            upstream_idle_timeout=_env_float(
                env, "SHARDGATE_UPSTREAM_IDLE_TIMEOUT", base.upstream_idle_timeout
            ),
            max_idle_per_pod=_env_int(env, "SHARDGATE_MAX_IDLE_PER_POD", base.max_idle_per_pod),
        )


@dataclass(frozen=True)
class Settings:
    """Everything `shardgate run` needs, from flags first and the environment second."""

    config_path: str | None = None
    configmap: str | None = None
    namespace: str = "default"
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin_listen: tuple[str, int] = ("0.0.0.0", 9090)
    workers: int = 1
    drain_delay: float = 5.0
    grace_timeout: float = 20.0
    config_poll_interval: float = 1.0
    watch_timeout: float = 300.0  # server-side timeout of one Kubernetes watch call
    watch_backoff_max: float = 30.0  # cap of the retry delay while the API server fails
    limits: Limits = field(default_factory=Limits)


def _pod_namespace() -> str | None:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def settings_from(
    *,
    config_path: str | None = None,
    configmap: str | None = None,
    namespace: str | None = None,
    listen: str | None = None,
    admin_listen: str | None = None,
    workers: int | None = None,
    drain_delay: float | None = None,
    grace_timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge command-line values (win) with SHARDGATE_* environment variables and defaults."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def address(value: str | None, name: str, default: str) -> tuple[str, int]:
        text = value or env.get(name) or default
        try:
            return parse_host_port(text)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            return ("0.0.0.0", 0)

    if not config_path and not configmap:  # a source given as a flag overrides both variables
        config_path = env.get("SHARDGATE_CONFIG") or None
        configmap = env.get("SHARDGATE_CONFIGMAP") or None
    if config_path and configmap:
        problems.append("config: give either --config or --configmap, not both")
    if not config_path and not configmap:
        problems.append("config: one of --config (SHARDGATE_CONFIG) or --configmap (SHARDGATE_CONFIGMAP)")
    ns = namespace or env.get("SHARDGATE_NAMESPACE") or _pod_namespace() or "default"
    listen_addr = address(listen, "SHARDGATE_LISTEN", "0.0.0.0:8080")
    admin_addr = address(admin_listen, "SHARDGATE_ADMIN_LISTEN", "0.0.0.0:9090")
    try:
        worker_count = workers if workers is not None else _env_int(env, "SHARDGATE_WORKERS", 1)
        if worker_count < 1:
            problems.append("SHARDGATE_WORKERS: must be at least 1")
        limits = Limits.from_env(env)
        drain = drain_delay if drain_delay is not None else _env_float(env, "SHARDGATE_DRAIN_DELAY", 5.0)
        grace = (
            grace_timeout if grace_timeout is not None else _env_float(env, "SHARDGATE_GRACE_TIMEOUT", 20.0)
        )
        for name, value in (("--drain-delay", drain), ("--grace-timeout", grace)):
            if value < 0:
                problems.append(f"{name}: must not be negative")
        watch_timeout = _env_float(env, "SHARDGATE_WATCH_TIMEOUT", 300.0)
        backoff_max = _env_float(env, "SHARDGATE_WATCH_BACKOFF_MAX", 30.0)
    except ConfigError as exc:
        problems.extend(exc.problems)
        worker_count, limits, drain, grace, watch_timeout, backoff_max = 1, Limits(), 5.0, 20.0, 300.0, 30.0
    if problems:
        raise ConfigError(problems)
    return Settings(
        config_path=config_path,
        configmap=configmap,
        namespace=ns,
        listen=listen_addr,
        admin_listen=admin_addr,
        workers=worker_count,
        drain_delay=drain,
        grace_timeout=grace,
        watch_timeout=watch_timeout,
        watch_backoff_max=backoff_max,
        limits=limits,
    )
