"""Process settings: one pydantic-settings model for ``shardgate run``, its supervisor and workers.

Every field is read from ``SHARDGATE_<FIELD>`` (``config_path`` from ``SHARDGATE_CONFIG``,
``upstream_timeout`` is the data plane's ``upstream_header_timeout``); an empty variable counts as
unset. The flags of ``shardgate run`` are passed in as init values, so a flag wins over its
variable. Each default is written once: here, or for the data plane's limits in ``Limits``
(which the model takes them from); the CLI help takes them from the model, and a test holds
the README tables to it.

With ``--workers N`` the supervisor loads the settings once and hands them to every worker in
its first message (``gateway.ipc.Start``); a worker reads no ``SHARDGATE_*`` variable itself.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.config import ConfigError, parse_host_port
from gateway.limits import Limits

ENV_PREFIX = "SHARDGATE_"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)


def _address(value: object) -> object:
    return parse_host_port(value) if isinstance(value, str) else value


# A host:port string in the environment or a flag, a (host, port) pair once validated.
Address = Annotated[tuple[str, int], NoDecode, BeforeValidator(_address)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


# The data plane's defaults, written once in its Limits class (the data plane and its tests
# build Limits() themselves).
_LIMITS = Limits()


def pod_namespace(service_account_dir: str = SERVICE_ACCOUNT_DIR) -> str:
    """The namespace of the pod we run in (the service account's ``namespace`` file), else default.
    The gateway's default, and the backend fence's (``gateway.fence``)."""
    try:
        return (Path(service_account_dir) / "namespace").read_text().strip() or "default"
    except OSError:
        return "default"


def _pod_namespace(data: dict[str, Any]) -> str:
    return pod_namespace(data.get("service_account_dir") or SERVICE_ACCOUNT_DIR)


def default_identity() -> str:
    """This replica's name among the gateways (its replica Lease, the leader Lease's holder): the
    pod's name in a cluster (stable across container restarts), else host name and process id."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return os.environ.get("HOSTNAME") or socket.gethostname()
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Everything a gateway process needs besides the shard config."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, populate_by_name=True, extra="forbid"
    )

    # -- Kubernetes: the service account's token, CA and namespace files in a pod. First: a
    # default factory that reads validated fields runs only while no field has failed yet.
    service_account_dir: str = SERVICE_ACCOUNT_DIR
    namespace: str = Field(default_factory=_pod_namespace)  # the pod's own, else "default"
    # -- where the shard config comes from: exactly one of the two
    config_path: str | None = Field(default=None, validation_alias="SHARDGATE_CONFIG")
    configmap: str | None = Field(default=None, validate_default=True)
    # -- hand-offs (docs/design/014-ownership-handoff.md)
    identity: str = Field(default_factory=default_identity, min_length=1, max_length=63)
    state_path: str | None = Field(default=None, validation_alias="SHARDGATE_STATE_FILE")  # --config only
    # -- processes
    listen: Address = ("0.0.0.0", 8080)
    admin_listen: Address = ("0.0.0.0", 9090)
    workers: int = Field(default=1, ge=1)
    drain_delay: Seconds = 5.0  # after SIGTERM: serve on while /readyz says 503
    grace_timeout: Seconds = 20.0  # then: wait this long for in-flight requests
    # -- Kubernetes watches
    watch_timeout: Seconds = 300.0  # server-side timeout of one watch call (then re-watched)
    watch_backoff_max: Seconds = 30.0  # cap of the retry delay while the API server fails
    # -- logs
    log_level: LogLevel = "INFO"
    log_format: Literal["json", "text"] = "json"
    access_log: str = "errors"  # errors | all | off | a sampling ratio such as 0.01
    slow_request_seconds: Seconds = 1.0
    # -- data plane (``limits``): the defaults are the Limits class's own
    max_header_bytes: Count = _LIMITS.max_header_bytes
    max_body_bytes: Count = _LIMITS.max_body_bytes
    connect_timeout: Seconds = _LIMITS.connect_timeout
    upstream_timeout: Seconds = _LIMITS.upstream_header_timeout  # also the longest silence mid-body
    client_header_timeout: Seconds = _LIMITS.client_header_timeout
    client_idle_timeout: Seconds = _LIMITS.client_idle_timeout
    upstream_idle_timeout: Seconds = _LIMITS.upstream_idle_timeout
    max_idle_per_pod: Count = _LIMITS.max_idle_per_pod

    @field_validator("configmap")
    @classmethod
    def _one_source(cls, configmap: str | None, info: ValidationInfo) -> str | None:
        config_path = info.data.get("config_path")
        if config_path and configmap:
            raise PydanticCustomError("config_source", "give either --config or --configmap, not both")
        if not config_path and not configmap:
            raise PydanticCustomError(
                "config_source", "one of --config (SHARDGATE_CONFIG) or --configmap (SHARDGATE_CONFIGMAP)"
            )
        return configmap

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.strip().upper() if info.field_name == "log_level" else value.strip().lower()

    @field_validator("access_log")
    @classmethod
    def _access_log(cls, value: str) -> str:
        mode = value.strip().lower()
        if mode in ("all", "errors", "off"):
            return mode
        try:
            ratio = float(mode)
        except ValueError:
            raise ValueError(f"{mode!r} is not all, errors, off or a ratio") from None
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio {ratio} is not between 0 and 1")
        return mode

    @property
    def limits(self) -> Limits:
        return Limits(
            max_header_bytes=self.max_header_bytes,
            max_body_bytes=self.max_body_bytes,
            connect_timeout=self.connect_timeout,
            upstream_header_timeout=self.upstream_timeout,
            client_header_timeout=self.client_header_timeout,
            client_idle_timeout=self.client_idle_timeout,
            upstream_idle_timeout=self.upstream_idle_timeout,
            max_idle_per_pod=self.max_idle_per_pod,
        )


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + field.upper()


def default_of(field: str) -> Any:
    """A field's default value (for the few places that need one without a Settings object)."""
    return Settings.model_fields[field].get_default(call_default_factory=False)


def default_text(field: str) -> str | None:
    """A field's default as an operator writes it (``20``, ``0.0.0.0:8080``); None if it has none."""
    info = Settings.model_fields[field]
    if info.default_factory is not None or info.default is None:
        return None
    value = info.default
    if isinstance(value, tuple):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def flag_help(what: str, field: str, default: str | None = None) -> str:
    """A flag's help text: what it sets, its variable and its default (``default`` for one that
    is not a plain value)."""
    default = default or default_text(field)
    return f"{what} ({env_name(field)}{f', default {default}' if default is not None else ''})"


_NAMES = {name: env_name(name) for name in Settings.model_fields} | {
    env_name(name): env_name(name) for name in Settings.model_fields
}


def _reason(error: ErrorDetails) -> str:
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{value!r} is not a non-negative integer"
    if kind in ("float_parsing", "float_type"):
        return f"{value!r} is not a number"
    if kind == "greater_than_equal":
        return "must not be negative" if ctx.get("ge") == 0 else f"must be at least {ctx.get('ge')}"
    if kind == "literal_error":
        return f"{value!r} is not one of {ctx.get('expected')}"
    return error["msg"].removeprefix("Value error, ")


def _problem(error: ErrorDetails) -> str:
    """``NAME: reason``, NAME being the variable (the flag's help names it too)."""
    if error["type"] == "config_source":  # about two variables at once
        return f"config: {error['msg']}"
    field = str(error["loc"][0]) if error["loc"] else ""
    return f"{_NAMES.get(field, field)}: {_reason(error)}"


def _init_key(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field


def load_settings(**flags: Any) -> Settings:
    """Settings from flags (those given, i.e. not None, win) over SHARDGATE_* variables over the
    defaults. Raises ConfigError with one ``NAME: reason`` per problem, every problem at once."""
    given = {name: value for name, value in flags.items() if value is not None}
    if given.keys() & {"config_path", "configmap"}:
        # A source given as a flag replaces both variables (--configmap with SHARDGATE_CONFIG set).
        given = {"config_path": None, "configmap": None} | given
    # Keyed as the environment source keys them (a field's alias, if it has one), so that a flag
    # replaces its variable rather than standing beside it.
    keyed = {_init_key(name): value for name, value in given.items()}
    try:
        return Settings(**keyed)
    except ValidationError as exc:
        raise ConfigError([_problem(error) for error in exc.errors()]) from None
