"""An in-process Kubernetes API-server double for tests: ConfigMaps, EndpointSlices and Leases.

It speaks the real wire protocol that the official ``kubernetes`` Python client (and any other
client) uses, so code under test can be pointed at it through an ordinary kubeconfig:

* Three namespaced kinds: ``configmaps`` (core ``/api/v1``), ``endpointslices``
  (``/apis/discovery.k8s.io/v1``) and ``leases`` (``/apis/coordination.k8s.io/v1``), at
  ``{prefix}/namespaces/{ns}/{resource}[/{name}]`` (plus the all-namespaces collections
  ``{prefix}/{resource}``, read-only).
* Reads: list (``kind: ConfigMapList`` ...; ``metadata.resourceVersion``; items carry no
  ``kind``/``apiVersion``, as the real server omits them) and get (with them), with
  ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``,
  comma-joined ANDs) and ``fieldSelector`` (``metadata.name`` / ``metadata.namespace`` with
  ``=``, ``==``, ``!=``). Reads are served from the store itself, never from a lagging cache:
  a read after a write's answer sees it (etcd's quorum reads).
* Writes, with the generic registry's semantics (``k8s.io/apiserver`` ``registry/generic``):

  - ``POST`` on a collection creates: ``201`` and the stored object (``uid``,
    ``resourceVersion``, ``creationTimestamp`` set by the server). ``metadata.name`` comes from
    the body (or ``generateName`` plus five characters); none: ``422 Invalid``; a
    ``metadata.namespace`` other than the URL's: ``400``; a ``resourceVersion`` in the body:
    ``500`` ("resourceVersion should not be set on objects to be created"); present already:
    ``409 AlreadyExists``.
  - ``PUT`` on an item replaces: a ``metadata.resourceVersion`` other than the stored one is
    ``409 Conflict`` ("Operation cannot be fulfilled on configmaps "NAME": the object has been
    modified; please apply your changes to the latest version and try again"); a
    ``metadata.uid`` other than the stored one is ``409`` too. Without a resourceVersion a
    ConfigMap or EndpointSlice is replaced unconditionally, but a Lease is ``422`` ("must be
    specified for an update"): the Lease strategy does not allow unconditional updates. An
    absent ConfigMap or EndpointSlice is ``404``; an absent Lease is created (``201``), as the
    Lease strategy allows create-on-update.
  - ``PATCH`` with ``application/merge-patch+json`` (RFC 7386, ``merge_patch()``) or
    ``application/strategic-merge-patch+json`` (which the Python client sends for a dict body;
    taken as a merge patch: the same for these kinds' maps, but a list is replaced, never merged
    by key, and ``$patch`` directives are refused). A ``metadata.resourceVersion`` in the patch
    is a precondition (``409`` on a mismatch). JSON Patch and server-side apply are ``415``.
  - ``DELETE`` on an item: ``200`` and a ``Status`` (``status: Success``, ``details`` with the
    uid), as for every kind that does not return the deleted object; ``404`` if absent; a
    ``DeleteOptions`` body's ``preconditions`` (``resourceVersion``, ``uid``) are checked
    (``409`` "Precondition failed: ...").
  - A write that changes nothing answers the stored object and makes no new version and no
    event, as etcd's store does. Lease ``spec.acquireTime``/``renewTime`` are MicroTimes: as
    on the real server a value that is not RFC 3339 with exactly six fractional digits and a
    zone is ``400``, and the stored value is rendered back in UTC
    (``2026-12-02T03:04:05.123456Z``). Kept metadata: ``labels``, ``annotations``,
    ``ownerReferences``, ``generateName`` (no finalizers: a delete is immediate).
* watch (``watch=true``/``watch=1`` on a collection) with ``resourceVersion``,
  ``allowWatchBookmarks``, ``timeoutSeconds`` and the selectors: a ``200`` chunked
  ``application/json`` stream of newline-terminated ``{"type": ..., "object": ...}`` events.

  - ``resourceVersion`` unset, ``""`` or ``"0"``: synthetic ``ADDED`` events for every object
    that matches now, then live events (the real "start at most recent / any" semantics).
  - ``resourceVersion=N``: every event newer than ``N`` is replayed from the (bounded) history,
    then live events. If ``N`` is older than the history window (``compact()``, or more than
    ``history_limit`` changes since) the stream carries one ``ERROR`` event whose object is the
    ``Status`` the real watch cache sends (``reason: Expired``, ``code: 410``,
    ``message: "too old resource version: N (FLOOR)"``) and then ends cleanly: the real server
    answers ``200`` and sends the error *in* the stream, it does not answer ``410``.
  - An object that starts/stops matching the selectors because its labels changed is reported
    as ``ADDED``/``DELETED`` (the DELETED object is the previous content with the event's
    ``resourceVersion``), as the real cacher does.
  - ``BOOKMARK`` events (only with ``allowWatchBookmarks=true``): the watched kind with only
    ``metadata.resourceVersion`` set, sent every ``bookmark_interval`` seconds and on
    ``send_bookmark()``.
  - ``timeoutSeconds``: the server ends the stream cleanly (terminating chunk) at the deadline.

* ``/version``, ``/api``, ``/api/v1``, ``/apis`` (discovery.k8s.io, then coordination.k8s.io),
  ``/apis/{group}[/v1]``: minimal discovery answers. Anything else is a ``404`` ``Status``; a
  method a path does not take is ``405``.

``resourceVersion`` is one global counter (as etcd's revision), rendered as a string; every
change (create, update, delete) takes the next value. A put that changes nothing is a no-op (no
new version, no event), as on the real server. Errors are ``Status`` objects with the real
``reason`` and message forms for their code. Requests need ``Authorization: Bearer <token>``
when ``require_auth`` (the default; the scheme is case-insensitive, as in RFC 7235 and the real
server, and the in-cluster loader of the Python client sends ``bearer``): the server's ``token``
and every token given to ``tokens``/``add_token()`` are accepted, and the kubeconfig written by
``kubeconfig()`` carries one; anything else gets ``401 Unauthorized``. With an ``ssl_context``
(a server certificate loaded) it serves HTTPS instead of plain HTTP, as a real API server does
for a pod's service account.

Clients: the bearer token a request presents names its client (``RequestRecord.client``), so
a harness of several processes, each with its own kubeconfig, can treat one of them apart:

* ``set_watch_delay(token, seconds)``: every event (bookmarks included) on that client's
  watches is delivered ``seconds`` after it happened, in order, from a queue of its own (other
  clients are not held up); lists, gets and writes are not delayed.
* ``cut_off(token)``: a partition. The client's open watches are dropped (no terminating
  chunk) and every new request of it has its connection closed without an answer (urllib3
  raises ``ProtocolError``, or ``MaxRetryError`` after retrying an idempotent method), until
  ``cut_off(token, False)``. Its requests never reach the store, so they are not recorded.

The server runs on its own event loop in a daemon thread, so blocking test code, other threads
and other processes can all use it. Every control method (``put_*``, ``delete_*``,
``drop_watches``, ``fail_requests``, ``set_down``, ``compact``, ``send_bookmark``, the client
controls, counters) is thread-safe; do not call the blocking ones (``drop_watches``,
``cut_off``, ``set_down``, ``stop``) from the double's own loop (they raise ``RuntimeError``
there).

Typical use::

    with FakeApiServer(tokens=["replica-a", "replica-b"]) as api:
        api.put_endpointslice("prod", "users-abc", "users", [endpoint("10.0.0.1")], [port()])
        api.kubeconfig(tmp_path / "a" / "kubeconfig", token="replica-a")
        api.set_watch_delay("replica-a", 0.5)
        ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import random
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from tests.support import LoopThread
from tests.support import wait_until as _wait_until

JSON = dict[str, Any]
_T = TypeVar("_T")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY_CONTROLLER = "endpointslice-controller.k8s.io"
DEFAULT_TOKEN = "shardgate-fake-apiserver-token"
SERVER_VERSION: JSON = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-fake",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# What the real server says when a write's resourceVersion is not the stored one (registry.Store).
OPTIMISTIC_LOCK_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)
# The layout of a MicroTime (metav1.RFC3339Micro) in Go's notation, as the server's errors quote it.
MICRO_TIME_LAYOUT = "2006-01-02T15:04:05.000000Z07:00"

# The `reason` the real API server puts in a Status for each HTTP code (metav1.StatusReason).
STATUS_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_object(code: int, message: str, reason: str | None = None, details: JSON | None = None) -> JSON:
    """A ``v1 Status`` failure object as the API server sends it (in bodies and ERROR events)."""
    status: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else STATUS_REASONS.get(code, ""),
        "code": code,
    }
    if details:
        status["details"] = details
    return status


def endpoint(
    *addresses: str,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    pod: str | None = None,
) -> JSON:
    """Build one EndpointSlice ``endpoints[]`` entry in API shape (a convenience for tests)."""
    entry: JSON = {
        "addresses": list(addresses),
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }
    if pod is not None:
        entry["targetRef"] = {"kind": "Pod", "name": pod}
    return entry


def port(number: int = 8080, name: str = "http", protocol: str = "TCP") -> JSON:
    """Build one EndpointSlice ``ports[]`` entry in API shape (a convenience for tests)."""
    return {"name": name, "port": number, "protocol": protocol}


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    return _wait_until(predicate, timeout, interval)


def _now_timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Resource kinds


@dataclass(frozen=True)
class _Kind:
    resource: str  # the URL name, e.g. "configmaps"
    kind: str  # e.g. "ConfigMap"
    api_version: str  # e.g. "v1" or "discovery.k8s.io/v1"
    short_names: tuple[str, ...] = ()
    # The kind's registry strategy: PUT of an absent object creates it (AllowCreateOnUpdate) ...
    create_on_update: bool = False
    # ... and a PUT without metadata.resourceVersion replaces whatever is stored
    # (AllowUnconditionalUpdate; otherwise 422).
    unconditional_update: bool = True
    string_maps: tuple[str, ...] = ()  # top-level fields that are map[string]string
    micro_times: tuple[str, ...] = ()  # spec fields that are MicroTime

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def group(self) -> str:
        """The API group ("" for the core group)."""
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def prefix(self) -> str:
        """The URL prefix of the kind's group version."""
        return f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"

    @property
    def qualified_resource(self) -> str:
        """``schema.GroupResource`` as errors spell it: "configmaps", "leases.coordination.k8s.io"."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    @property
    def qualified_kind(self) -> str:
        """``schema.GroupKind`` as validation errors spell it: "ConfigMap", "Lease.coordination.k8s.io"."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


CONFIGMAPS = _Kind("configmaps", "ConfigMap", "v1", ("cm",), string_maps=("data", "binaryData"))
ENDPOINTSLICES = _Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1")
LEASES = _Kind(
    "leases",
    "Lease",
    "coordination.k8s.io/v1",
    create_on_update=True,
    unconditional_update=False,
    micro_times=("acquireTime", "renewTime"),
)
_KINDS = {k.resource: k for k in (CONFIGMAPS, ENDPOINTSLICES, LEASES)}
# The groups /apis lists, in its order (the core group is /api's).
_GROUPS = ("discovery.k8s.io", "coordination.k8s.io")

# Metadata a client sets and the server keeps (besides name, namespace and labels); everything
# else in a body's metadata is the server's (uid, resourceVersion, creationTimestamp) or not kept.
_USER_METADATA = ("annotations", "ownerReferences", "generateName")
_TYPE_AND_META = ("kind", "apiVersion", "metadata")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GENERATED_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # utilrand's alphabet (no vowels, no 0/1/3)
_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply a JSON merge patch (RFC 7386) to ``target``; neither is modified.

    An object merges key by key, ``null`` removes a key, and anything else (a list included)
    replaces the target's value.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: JSON = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def micro_time(text: Any) -> str:
    """A MicroTime as the real server stores and renders it (UTC, six fractional digits, ``Z``).

    Raises ``ValueError`` for what the server cannot decode: Go parses ``RFC3339Micro``, which
    wants exactly six fractional digits and a zone (``Z`` or ``+hh:mm``), so Python's
    ``isoformat()`` of a naive datetime, or of one whose microsecond is 0, is refused.
    """
    if not isinstance(text, str) or not _MICRO_TIME.match(text):
        raise ValueError(f"parsing time {json.dumps(text)} as {json.dumps(MICRO_TIME_LAYOUT)}")
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------------
# Selectors


class SelectorError(ValueError):
    """A label or field selector the server cannot parse (answered with 400 BadRequest)."""


_Requirement = Callable[[Mapping[str, str]], bool]

_LABEL_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_SET_RE = re.compile(rf"^({_LABEL_KEY})\s+(in|notin)\s*\(([^()]*)\)$")
_CMP_RE = re.compile(rf"^({_LABEL_KEY})\s*(==|=|!=)\s*([-A-Za-z0-9_.]*)$")
_EXISTS_RE = re.compile(rf"^(!?)\s*({_LABEL_KEY})$")


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced parenthesis in {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise SelectorError(f"unbalanced parenthesis in {text!r}")
    parts.append("".join(current))
    return parts


# One function per requirement form, so that each closure binds its own key and values.
def _label_in(key: str, values: frozenset[str], *, negate: bool) -> _Requirement:
    return lambda labels: (labels.get(key) in values) != negate


def _label_equals(key: str, value: str, *, negate: bool) -> _Requirement:
    return lambda labels: (labels.get(key) == value) != negate


def _label_exists(key: str, *, negate: bool) -> _Requirement:
    return lambda labels: (key in labels) != negate


def _field_equals(attr: str, value: str, *, negate: bool) -> Callable[[JSON], bool]:
    return lambda obj: (obj["metadata"].get(attr) == value) != negate


def parse_label_selector(text: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Parse a Kubernetes label selector into a predicate over a label map."""
    if text is None or not text.strip():
        return lambda _labels: True
    requirements: list[_Requirement] = []
    for raw in _split_top_level(text):
        part = raw.strip()
        if not part:
            raise SelectorError(f"found empty requirement in {text!r}")
        if match := _SET_RE.match(part):
            key, op, values_text = match.groups()
            values = frozenset(v.strip() for v in values_text.split(",") if v.strip())
            if not values:
                raise SelectorError(f"for 'in', 'notin' operators, values set can't be empty: {part!r}")
            requirements.append(_label_in(key, values, negate=op == "notin"))
        elif match := _CMP_RE.match(part):
            key, op, value = match.groups()
            requirements.append(_label_equals(key, value, negate=op == "!="))
        elif match := _EXISTS_RE.match(part):
            negate, key = match.groups()
            requirements.append(_label_exists(key, negate=bool(negate)))
        else:
            raise SelectorError(f"unable to parse requirement: {part!r}")
    return lambda labels: all(req(labels) for req in requirements)


_FIELD_RE = re.compile(r"^([A-Za-z.]+)\s*(==|=|!=)\s*(.*)$")
_SUPPORTED_FIELDS = ("metadata.name", "metadata.namespace")


def parse_field_selector(text: str | None) -> Callable[[JSON], bool]:
    """Parse a field selector (``metadata.name`` / ``metadata.namespace``) into an object predicate."""
    if text is None or not text.strip():
        return lambda _obj: True
    checks: list[Callable[[JSON], bool]] = []
    for raw in text.split(","):
        part = raw.strip()
        match = _FIELD_RE.match(part)
        if match is None:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {part!r}")
        name, op, value = match.groups()
        if name not in _SUPPORTED_FIELDS:
            raise SelectorError(f"field label not supported: {name}")
        attr = name.split(".", 1)[1]
        checks.append(_field_equals(attr, value, negate=op == "!="))
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class RequestRecord:
    """One request the double received (kept for assertions)."""

    method: str
    path: str
    # "list", "watch", "get", "create", "update", "patch", "delete", "deletecollection",
    # "discovery" or "other"
    verb: str
    resource: str | None  # "configmaps", "endpointslices", "leases" or None
    namespace: str | None
    query: dict[str, str]
    authorization: str | None
    at: float
    client: str | None = None  # the bearer token presented (accepted or not), None without one


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: _Kind
    namespace: str
    obj: JSON  # the new state (for DELETED: the last state, with the deletion's resourceVersion)
    prev: JSON | None  # the state before this change (None for ADDED)
    at: float = field(default_factory=time.monotonic)  # when it happened


@dataclass(frozen=True)
class _Queued:
    """One item for a watch handler: an "event", a "bookmark", or a "drop"/"wake" signal."""

    kind: str
    payload: Any
    at: float  # when it happened: a delayed client gets it at ``at + delay``


@dataclass(eq=False)
class _Watch:
    kind: _Kind
    namespace: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[JSON], bool]
    bookmarks: bool
    queue: asyncio.Queue[_Queued]
    transport: asyncio.BaseTransport | None
    client: str | None = None
    started: float = field(default_factory=time.monotonic)

    def matches(self, obj: JSON) -> bool:
        return self.labels(obj["metadata"].get("labels") or {}) and self.fields(obj)

    def translate(self, event: _Event) -> tuple[str, JSON] | None:
        """The event this watcher sees for a change (cacher semantics), or None."""
        if event.kind is not self.kind:
            return None
        if self.namespace is not None and event.namespace != self.namespace:
            return None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if self.matches(event.obj) else None
        now = self.matches(event.obj)
        before = event.prev is not None and self.matches(event.prev)
        if now and before:
            return "MODIFIED", event.obj
        if now:
            return "ADDED", event.obj
        if before:
            assert event.prev is not None
            gone = copy.deepcopy(event.prev)
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return "DELETED", gone
        return None


class _ApiError(Exception):
    """A request the server refuses; the middleware answers it with this ``Status``."""

    def __init__(
        self, code: int, message: str, reason: str | None = None, details: JSON | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status_object(code, message, reason, details)


def _details(kind: _Kind, name: str, **extra: Any) -> JSON:
    """``StatusDetails`` naming an object of ``kind`` (``group`` omitted for the core group)."""
    details: JSON = {"name": name}
    if kind.group:
        details["group"] = kind.group
    return details | {"kind": kind.resource} | extra


def _not_found(kind: _Kind, name: str) -> _ApiError:
    return _ApiError(404, f'{kind.qualified_resource} "{name}" not found', details=_details(kind, name))


def _already_exists(kind: _Kind, name: str) -> _ApiError:
    return _ApiError(
        409, f'{kind.qualified_resource} "{name}" already exists', "AlreadyExists", _details(kind, name)
    )


def _conflict(kind: _Kind, name: str, why: str) -> _ApiError:
    """``apierrors.NewConflict``: a stale resourceVersion or a failed precondition."""
    message = f'Operation cannot be fulfilled on {kind.qualified_resource} "{name}": {why}'
    return _ApiError(409, message, "Conflict", _details(kind, name))


def _invalid(
    kind: _Kind, name: str, path: str, error: str, *, cause: str = "FieldValueInvalid", by_kind: bool = True
) -> _ApiError:
    """``apierrors.NewInvalid`` with one field error. A validation error names the object's
    kind ("Lease.coordination.k8s.io"); the update path's resourceVersion check names the
    resource instead ("leases.coordination.k8s.io"; ``by_kind=False``), as the real one does."""
    group_kind, kind_name = (
        (kind.qualified_kind, kind.kind) if by_kind else (kind.qualified_resource, kind.resource)
    )
    details: JSON = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details |= {"kind": kind_name, "causes": [{"reason": cause, "message": error, "field": path}]}
    return _ApiError(422, f'{group_kind} "{name}" is invalid: {path}: {error}', "Invalid", details)


def _undecodable(kind: _Kind, why: str) -> _ApiError:
    """The 400 of a body the server cannot decode into the kind's Go type."""
    return _ApiError(
        400, f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}: {why}'
    )


@dataclass
class _Failure:
    remaining: int
    status: int
    message: str
    reason: str | None
    verb: str | None
    retry_after: int | None


class FakeApiServer:
    """The API-server double. Construct, then ``start()`` (or use as a context manager)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_limit: int = 10_000,
        bookmark_interval: float | None = None,
        default_watch_timeout: float | None = None,
        token: str = DEFAULT_TOKEN,
        tokens: Iterable[str] = (),
        require_auth: bool = True,
        start_version: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.history_limit = history_limit
        #: Seconds between periodic BOOKMARK events on watches that allow them (None: on demand only).
        self.bookmark_interval = bookmark_interval
        #: Server-side watch timeout when the request gives no ``timeoutSeconds`` (None: none).
        self.default_watch_timeout = default_watch_timeout
        #: The default client's bearer token (kubeconfig() writes it unless told another).
        self.token = token
        self.require_auth = require_auth
        self.ssl_context = ssl_context  # None: plain HTTP

        self._lock = threading.Lock()
        self._rv = start_version
        self._floor = start_version  # watches from a resourceVersion below this get 410
        self._objects: dict[tuple[str, str, str], JSON] = {}
        self._history: collections.deque[_Event] = collections.deque()
        self._watches: set[_Watch] = set()
        self._failures: list[_Failure] = []
        self._requests: list[RequestRecord] = []
        self._down = False
        self._tokens: set[str] = set(tokens)  # accepted besides self.token
        self._watch_delays: dict[str, float] = {}  # client token -> seconds
        self._cut_off: set[str] = set()  # client tokens whose requests are dropped

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> FakeApiServer:
        """Start serving on a background thread; return once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeApiServer already started")
        loop_thread = LoopThread(self._startup, name="fake-apiserver", shutdown_asyncgens=True)
        self._loop, self._thread = loop_thread.loop, loop_thread.thread
        loop_thread.start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop listening and end the thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._check_not_loop_thread()
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeApiServer not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def kubeconfig(self, path: str | Path, namespace: str = "default", token: str | None = None) -> Path:
        """Write a kubeconfig (cluster ``url``, bearer token user, current-context); it carries no
        CA, so it is for the plain-HTTP double.

        ``token`` (default: the server's ``token``) is the client's identity; the server accepts
        it only if it was given to ``tokens`` or ``add_token()`` (else 401, which makes this the
        kubeconfig of a refused client too).
        """
        token = self.token if token is None else token
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": token}}],
            "contexts": [
                {"name": "fake", "context": {"cluster": "fake", "user": "fake-user", "namespace": namespace}}
            ],
            "current-context": "fake",
            "preferences": {},
        }
        # JSON is YAML: load_kube_config reads it as it is.
        target.write_text(json.dumps(config, indent=2) + "\n")
        return target

    # -- objects ---------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion (the version of the latest change)."""
        with self._lock:
            return str(self._rv)

    def put_configmap(
        self, namespace: str, name: str, data: Mapping[str, str], labels: Mapping[str, str] | None = None
    ) -> JSON:
        """Create or replace a ConfigMap; return a copy of the stored object (with kind)."""
        body: JSON = {"data": dict(data)}
        return self._put(CONFIGMAPS, namespace, name, body, dict(labels or {}))

    def delete_configmap(self, namespace: str, name: str) -> JSON | None:
        """Delete a ConfigMap; return its last state (None if it did not exist)."""
        return self._delete(CONFIGMAPS, namespace, name)

    def put_endpointslice(
        self,
        namespace: str,
        name: str,
        service: str,
        endpoints: Iterable[Mapping[str, Any]],
        ports: Iterable[Mapping[str, Any]] | None = None,
        *,
        address_type: str = "IPv4",
        labels: Mapping[str, str] | None = None,
    ) -> JSON:
        """Create or replace an EndpointSlice of ``service`` (label ``kubernetes.io/service-name``).

        ``endpoints``/``ports`` are in API shape, e.g. ``{"addresses": ["10.0.0.1"], "conditions":
        {"ready": True, "serving": True, "terminating": False}, "targetRef": {"kind": "Pod",
        "name": "p"}}`` and ``{"name": "http", "port": 8080, "protocol": "TCP"}``.
        """
        all_labels = {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY_CONTROLLER}
        all_labels.update(labels or {})
        body: JSON = {
            "addressType": address_type,
            "endpoints": [copy.deepcopy(dict(e)) for e in endpoints],
            "ports": [copy.deepcopy(dict(p)) for p in (ports or [])],
        }
        return self._put(ENDPOINTSLICES, namespace, name, body, all_labels)

    def delete_endpointslice(self, namespace: str, name: str) -> JSON | None:
        """Delete an EndpointSlice; return its last state (None if it did not exist)."""
        return self._delete(ENDPOINTSLICES, namespace, name)

    def put_lease(
        self, namespace: str, name: str, spec: Mapping[str, Any], labels: Mapping[str, str] | None = None
    ) -> JSON:
        """Create or replace a coordination.k8s.io/v1 Lease; return a copy of the stored object.

        ``spec`` is in API shape (``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``,
        ``renewTime``, ``leaseTransitions``). Its MicroTimes are stored as the server would hold
        them (``micro_time()``): one in the server's own form, like
        ``2026-12-02T03:04:05.123456Z``, is kept as given, another offset is rendered in UTC, and
        one the server could not decode raises ``ValueError`` (so the double never holds what a
        real cluster could not).
        """
        body: JSON = {"spec": _normalize_micro_times(LEASES, spec)}
        return self._put(LEASES, namespace, name, body, dict(labels or {}))

    def delete_lease(self, namespace: str, name: str) -> JSON | None:
        """Delete a Lease; return its last state (None if it did not exist)."""
        return self._delete(LEASES, namespace, name)

    def get_object(self, resource: str, namespace: str, name: str) -> JSON | None:
        """A copy of a stored object (``resource``: "configmaps", "endpointslices" or "leases")."""
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _put(self, kind: _Kind, namespace: str, name: str, body: JSON, labels: dict[str, str]) -> JSON:
        with self._lock:
            return copy.deepcopy(self._put_locked(kind, namespace, name, body, labels))

    def _put_locked(
        self,
        kind: _Kind,
        namespace: str,
        name: str,
        body: JSON,
        labels: Mapping[str, str],
        user_metadata: Mapping[str, Any] | None = None,
    ) -> JSON:
        """Store ``body`` (the object without kind, apiVersion and metadata) as the whole new
        content; return the stored object itself. Unchanged content, labels and metadata: a
        no-op (the stored object, no new version, no event). Caller holds the lock."""
        key = (kind.resource, namespace, name)
        extra = dict(user_metadata or {})
        prev = self._objects.get(key)
        if (
            prev is not None
            and _content(prev) == body
            and (prev["metadata"].get("labels") or {}) == labels
            and _user_metadata(prev["metadata"]) == extra
        ):
            return prev
        self._rv += 1
        meta: JSON = {
            "name": name,
            "namespace": namespace,
            "uid": prev["metadata"]["uid"] if prev else str(uuid.uuid4()),
            "resourceVersion": str(self._rv),
            "creationTimestamp": prev["metadata"]["creationTimestamp"] if prev else _now_timestamp(),
        }
        if labels:
            meta["labels"] = dict(labels)
        meta.update(copy.deepcopy(extra))
        obj: JSON = {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}
        obj.update(copy.deepcopy(body))
        self._objects[key] = obj
        self._record(_Event(self._rv, "MODIFIED" if prev else "ADDED", kind, namespace, obj, prev))
        return obj

    def _delete(self, kind: _Kind, namespace: str, name: str) -> JSON | None:
        with self._lock:
            gone = self._delete_locked(kind, namespace, name)
            return copy.deepcopy(gone) if gone is not None else None

    def _delete_locked(self, kind: _Kind, namespace: str, name: str) -> JSON | None:
        """Remove an object; return its last state with the deletion's resourceVersion (None if
        absent). Caller holds the lock."""
        prev = self._objects.pop((kind.resource, namespace, name), None)
        if prev is None:
            return None
        self._rv += 1
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._record(_Event(self._rv, "DELETED", kind, namespace, gone, prev))
        return gone

    def _record(self, event: _Event) -> None:
        """Append to the history and fan out to live watches. Caller holds the lock."""
        self._history.append(event)
        while len(self._history) > self.history_limit:
            self._floor = self._history.popleft().rv
        for watch in self._watches:
            seen = watch.translate(event)
            if seen is not None:
                self._enqueue(watch, "event", seen, event.at)

    def _enqueue(self, watch: _Watch, kind: str, payload: Any = None, at: float | None = None) -> None:
        """Queue an item for a watch handler, in lock order. Caller holds the lock."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        item = _Queued(kind, payload, time.monotonic() if at is None else at)
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(watch.queue.put_nowait, item)

    # -- API writes (the request handlers' side; every one runs under the lock) --------------------

    def _create_locked(self, kind: _Kind, namespace: str, body: JSON, *, post: bool) -> JSON:
        """``registry.Store.Create`` (``post``) or the create half of a create-on-update PUT."""
        meta = body.get("metadata") or {}
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise _ApiError(
                400, "the namespace of the provided object does not match the namespace sent on the request"
            )
        name = meta.get("name") or ""
        if not name and meta.get("generateName"):
            name = meta["generateName"] + "".join(random.choices(_GENERATED_CHARS, k=5))
        if not name:
            raise _invalid(
                kind,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
                cause="FieldValueRequired",
            )
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise _invalid(
                kind, name, "metadata.name", f"Invalid value: {json.dumps(name)}: {_DNS_SUBDOMAIN_ERROR}"
            )
        content, labels, extra = _split_body(kind, name, body)
        if post and meta.get("resourceVersion"):
            # etcd3 store.Create refuses it before it looks; the handler makes it an InternalError.
            raise _ApiError(
                500, "Internal error occurred: resourceVersion should not be set on objects to be created"
            )
        if (kind.resource, namespace, name) in self._objects:
            raise _already_exists(kind, name)
        return self._put_locked(kind, namespace, name, content, labels, extra)

    def _replace_locked(self, kind: _Kind, namespace: str, name: str, body: JSON) -> tuple[JSON, bool]:
        """``registry.Store.Update`` of a PUT: the stored object and whether it was created."""
        _check_identity(kind, namespace, name, body)
        prev = self._objects.get((kind.resource, namespace, name))
        if prev is None:
            if not kind.create_on_update:
                raise _not_found(kind, name)
            # The uid precondition is checked against the empty object that stands for "absent".
            _check_uid(kind, name, (body.get("metadata") or {}).get("uid"), {"metadata": {"uid": ""}})
            return self._create_locked(kind, namespace, body, post=False), True
        return self._update_locked(kind, namespace, name, body, prev), False

    def _patch_locked(self, kind: _Kind, namespace: str, name: str, patch: JSON) -> JSON:
        """A merge patch: applied to the stored object, then written as an update of it."""
        prev = self._objects.get((kind.resource, namespace, name))
        if prev is None:
            raise _not_found(kind, name)
        patched = merge_patch(prev, patch)
        _check_type(kind, patched)
        _check_identity(kind, namespace, name, patched)
        return self._update_locked(kind, namespace, name, patched, prev)

    def _update_locked(self, kind: _Kind, namespace: str, name: str, body: JSON, prev: JSON) -> JSON:
        """The preconditions of an update (uid, then resourceVersion), then the write."""
        meta = body.get("metadata") or {}
        _check_uid(kind, name, meta.get("uid"), prev)
        rv = meta.get("resourceVersion") or ""
        if not rv and not kind.unconditional_update:
            raise _invalid(
                kind,
                name,
                "metadata.resourceVersion",
                "Invalid value: 0x0: must be specified for an update",
                by_kind=False,
            )
        if rv and _parse_rv(rv) != int(prev["metadata"]["resourceVersion"]):
            raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
        content, labels, extra = _split_body(kind, name, body)
        return self._put_locked(kind, namespace, name, content, labels, extra)

    def _delete_checked_locked(self, kind: _Kind, namespace: str, name: str, options: JSON) -> JSON:
        """A DELETE with ``DeleteOptions.preconditions``; the Status the real server answers."""
        prev = self._objects.get((kind.resource, namespace, name))
        if prev is None:
            raise _not_found(kind, name)
        preconditions = options.get("preconditions") or {}
        _check_uid(kind, name, preconditions.get("uid"), prev)
        want = preconditions.get("resourceVersion")
        have = prev["metadata"]["resourceVersion"]
        if want is not None and want != have:
            why = f"ResourceVersion in precondition: {want}, ResourceVersion in object meta: {have}"
            raise _conflict(kind, name, f"Precondition failed: {why}")
        self._delete_locked(kind, namespace, name)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": _details(kind, name, uid=prev["metadata"]["uid"]),
        }

    # -- clients ----------------------------------------------------------------------------------

    def add_token(self, token: str) -> None:
        """Accept ``token`` as a bearer token from now on (a client of its own)."""
        with self._lock:
            self._tokens.add(token)

    def set_watch_delay(self, token: str, seconds: float) -> None:
        """Deliver every event (bookmarks too) on the watches of client ``token`` ``seconds``
        after it happened, in order; 0 clears it. Open watches follow at once (what is held
        back is released on the new schedule), and so does every watch opened later. Nothing
        else is delayed: lists, gets, writes, and other clients' watches."""
        if seconds < 0:
            raise ValueError(f"a watch delay cannot be negative: {seconds}")
        with self._lock:
            if seconds:
                self._watch_delays[token] = float(seconds)
            else:
                self._watch_delays.pop(token, None)
            for watch in self._watches:
                if watch.client == token:
                    self._enqueue(watch, "wake")

    def watch_delay(self, token: str) -> float:
        """The watch delay of client ``token`` in seconds (0: none)."""
        with self._lock:
            return self._watch_delays.get(token, 0.0)

    def cut_off(self, token: str, cut: bool = True, timeout: float = 5.0) -> int:
        """Partition client ``token`` (``cut``) or heal it (``cut=False``).

        While cut off, its open watches are dropped without a terminating chunk and every new
        request of it has its connection closed before any answer; other clients are not
        affected. Returns how many watches were dropped.
        """
        with self._lock:
            if not cut:
                self._cut_off.discard(token)
                return 0
            self._cut_off.add(token)
        return self._run_on_loop(self._drop_watches(lambda watch: watch.client == token), timeout)

    def is_cut_off(self, token: str) -> bool:
        with self._lock:
            return token in self._cut_off

    # -- history, bookmarks, watches ----------------------------------------------------------

    def compact(self) -> str:
        """Forget the history: a watch from any version older than the current one gets 410.

        Returns the current resourceVersion (the oldest one a watch can still resume from).
        """
        with self._lock:
            self._history.clear()
            self._floor = self._rv
            return str(self._rv)

    def send_bookmark(self) -> int:
        """Send a BOOKMARK (current resourceVersion) on every open watch that allows them.

        Returns how many watches it was queued on.
        """
        with self._lock:
            count = 0
            for watch in self._watches:
                if watch.bookmarks:
                    self._enqueue(watch, "bookmark", self._rv)
                    count += 1
            return count

    @property
    def active_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def watch_count(self, resource: str | None = None, *, client: str | None = None) -> int:
        """How many watch streams are open now (optionally of one resource, of one client)."""
        with self._lock:
            return sum(
                1
                for w in self._watches
                if (resource is None or w.kind.resource == resource)
                and (client is None or w.client == client)
            )

    def wait_for_watches(
        self, count: int = 1, timeout: float = 5.0, resource: str | None = None, *, client: str | None = None
    ) -> bool:
        """Poll until at least ``count`` watch streams are open; return whether they are."""
        return wait_until(lambda: self.watch_count(resource, client=client) >= count, timeout)

    def drop_watches(self, timeout: float = 5.0) -> int:
        """Abruptly close every open watch connection (no terminating chunk); return how many."""
        return self._run_on_loop(self._drop_watches(), timeout)

    # -- fault injection ------------------------------------------------------------------------

    def fail_requests(
        self,
        n: int,
        status: int = 500,
        *,
        message: str | None = None,
        reason: str | None = None,
        verb: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer the next ``n`` requests (optionally only of ``verb``: "list", "watch", "get",
        "create", "update", "patch", "delete", "discovery") with ``status`` and a ``Status`` body
        (a write refused so is not made); ``retry_after`` adds that header."""
        with self._lock:
            self._failures.append(
                _Failure(
                    remaining=n,
                    status=status,
                    message=message or f"fake apiserver: injected failure ({status})",
                    reason=reason,
                    verb=verb,
                    retry_after=retry_after,
                )
            )

    def clear_failures(self) -> int:
        """Forget every pending injected failure; return how many requests they still covered."""
        with self._lock:
            left = sum(f.remaining for f in self._failures)
            self._failures.clear()
            return left

    def set_down(self, down: bool, timeout: float = 10.0) -> None:
        """``True``: stop listening (connections are refused) and close every open connection.

        ``False``: listen again on the same port.
        """
        self._run_on_loop(self._set_down(down), timeout)

    @property
    def is_down(self) -> bool:
        return self._down

    # -- request accounting -----------------------------------------------------------------------

    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request received, oldest first."""
        with self._lock:
            return list(self._requests)

    def count(
        self,
        verb: str | None = None,
        resource: str | None = None,
        path: str | None = None,
        *,
        client: str | None = None,
    ) -> int:
        """How many requests matched all the given filters (``verb`` as in ``RequestRecord``;
        ``client``: the bearer token presented)."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (verb is None or r.verb == verb)
                and (resource is None or r.resource == resource)
                and (path is None or r.path == path)
                and (client is None or r.client == client)
            )

    def counts(self) -> dict[tuple[str, str], int]:
        """Request counts per ``(verb, path)``."""
        result: dict[tuple[str, str], int] = collections.Counter()
        with self._lock:
            for r in self._requests:
                result[(r.verb, r.path)] += 1
        return dict(result)

    def reset_counts(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- the event loop side ----------------------------------------------------------------------

    def _check_not_loop_thread(self) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError("blocking FakeApiServer call from its own event loop")

    def _run_on_loop(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        loop = self._loop
        if loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("FakeApiServer not started")
        self._check_not_loop_thread()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        router = app.router
        router.add_route("*", "/version", self._handle_version, name="discovery:version")
        router.add_route("*", "/api", self._handle_api, name="discovery:api")
        router.add_route("*", "/api/v1", self._handle_api_v1, name="discovery:api-v1")
        router.add_route("*", "/apis", self._handle_apis, name="discovery:apis")
        for group in _GROUPS:
            router.add_route(
                "*", f"/apis/{group}", self._group_handler(group), name=f"discovery:group:{group}"
            )
            router.add_route(
                "*", f"/apis/{group}/v1", self._group_version_handler(group), name=f"discovery:gv:{group}"
            )
        for kind in _KINDS.values():
            prefix = kind.prefix
            collection = self._collection_handler(kind)
            item = self._item_handler(kind)
            router.add_route("*", f"{prefix}/{kind.resource}", collection, name=f"collection:{kind.resource}")
            router.add_route(
                "*",
                f"{prefix}/namespaces/{{ns}}/{kind.resource}",
                collection,
                name=f"collection:{kind.resource}:ns",
            )
            router.add_route(
                "*",
                f"{prefix}/namespaces/{{ns}}/{kind.resource}/{{name}}",
                item,
                name=f"item:{kind.resource}",
            )
        router.add_route("*", "/{tail:.*}", self._handle_not_found, name="other")
        return app

    async def _startup(self) -> None:
        # handler_cancellation: a watch whose client went away is cancelled (and unregistered)
        # at once, as the real server's request context is, not at its next write.
        self._runner = web.AppRunner(
            self._make_app(),
            handle_signals=False,
            access_log=None,
            shutdown_timeout=1.0,
            handler_cancellation=True,
        )
        await self._runner.setup()
        await self._listen(self._requested_port)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        self._site = site
        self._port = site.port

    async def _close_connections(self) -> int:
        """Close every watch and every other open connection (FIN after flushing)."""
        dropped = await self._drop_watches()
        server = self._runner.server if self._runner is not None else None
        if server is not None:
            for handler in server.connections:
                transport = handler.transport
                if transport is not None:
                    transport.close()
        return dropped

    async def _drop_watches(self, selected: Callable[[_Watch], bool] | None = None) -> int:
        """Close every open watch (or those ``selected`` picks) without a terminating chunk."""
        with self._lock:
            watches = [w for w in self._watches if selected is None or selected(w)]
            self._watches.difference_update(watches)
        for watch in watches:
            watch.queue.put_nowait(_Queued("drop", None, time.monotonic()))
            if watch.transport is not None:
                # close() flushes what was already written, then FIN: the client reads every
                # complete event and then sees the chunked body end without its last chunk.
                watch.transport.close()
        return len(watches)

    async def _set_down(self, down: bool) -> None:
        if down == self._down:
            return
        if down:
            self._down = True
            if self._site is not None:
                await self._site.stop()
                self._site = None
            await self._close_connections()
        else:
            await self._listen(self.port)
            self._down = False

    async def _shutdown(self) -> None:
        self._down = True
        await self._close_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._site = None

    # -- HTTP ---------------------------------------------------------------------------------------

    @staticmethod
    def _json(body: JSON, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=dict(headers or {}),
        )

    def _status(
        self, code: int, message: str, reason: str | None = None, details: JSON | None = None
    ) -> web.Response:
        return self._json(status_object(code, message, reason, details), status=code)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        route = request.match_info.route.name or "other"
        family, _, rest = route.partition(":")
        resource = rest.split(":")[0] if family in ("collection", "item") else None
        client = _bearer_token(request.headers.get("Authorization"))
        if client is not None and self.is_cut_off(client):
            return _refuse(request)  # a partition: the request never reaches the server
        verb = _verb(family, request.method, request.query)
        record = RequestRecord(
            method=request.method,
            path=request.path,
            verb=verb,
            resource=resource,
            namespace=request.match_info.get("ns"),
            query=dict(request.query),
            authorization=request.headers.get("Authorization"),
            at=time.monotonic(),
            client=client,
        )
        with self._lock:
            self._requests.append(record)
            failure = self._take_failure(verb)
        if failure is not None:
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
            body = status_object(failure.status, failure.message, failure.reason)
            return self._json(body, status=failure.status, headers=headers)
        if self.require_auth and not self._authorized(client):
            return self._status(401, "Unauthorized")
        allowed = _METHODS.get((family, "ns" in request.match_info))
        if allowed is not None and request.method not in allowed:
            return self._status(405, "the server does not allow this method on the requested resource")
        try:
            response: web.StreamResponse = await handler(request)
        except _ApiError as error:
            return self._json(error.status, status=error.code)
        return response

    def _authorized(self, token: str | None) -> bool:
        if token is None:
            return False
        with self._lock:
            return token == self.token or token in self._tokens

    def _take_failure(self, verb: str) -> _Failure | None:
        """Consume one matching injected failure. Caller holds the lock."""
        for failure in self._failures:
            if failure.remaining > 0 and (failure.verb is None or failure.verb == verb):
                failure.remaining -= 1
                if failure.remaining == 0:
                    self._failures.remove(failure)
                return failure
        return None

    async def _handle_not_found(self, request: web.Request) -> web.StreamResponse:
        return self._status(404, "the server could not find the requested resource")

    async def _handle_version(self, request: web.Request) -> web.StreamResponse:
        return self._json(SERVER_VERSION)

    async def _handle_api(self, request: web.Request) -> web.StreamResponse:
        return self._json(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        )

    async def _handle_apis(self, request: web.Request) -> web.StreamResponse:
        groups = [_api_group(group) for group in _GROUPS]
        return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _handle_api_v1(self, request: web.Request) -> web.StreamResponse:
        return self._json(_resource_list("v1"))

    def _group_handler(self, group: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return self._json({"kind": "APIGroup", "apiVersion": "v1", **_api_group(group)})

        return handle

    def _group_version_handler(self, group: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return self._json(_resource_list(f"{group}/v1"))

        return handle

    def _item_handler(self, kind: _Kind) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace, name = request.match_info["ns"], request.match_info["name"]
            if request.method in ("PUT", "PATCH", "DELETE"):
                return await self._write_item(request, kind, namespace, name)
            with self._lock:
                obj = copy.deepcopy(self._objects.get((kind.resource, namespace, name)))
            if obj is None:
                raise _not_found(kind, name)
            return self._json(obj)

        return handle

    async def _write_item(self, request: web.Request, kind: _Kind, namespace: str, name: str) -> web.Response:
        """PUT (replace), PATCH (merge patch) or DELETE of one object."""
        _refuse_dry_run(request)
        if request.method == "PUT":
            body = await _read_json(request, _OBJECT_TYPES)
            _check_type(kind, body)
            with self._lock:
                stored, created = self._replace_locked(kind, namespace, name, body)
                answer = copy.deepcopy(stored)
            return self._json(answer, status=201 if created else 200)
        if request.method == "PATCH":
            patch = await _read_json(request, _PATCH_TYPES)
            if not isinstance(patch, dict):
                raise _ApiError(400, "a merge patch must be a JSON object")
            if request.content_type == "application/strategic-merge-patch+json":
                _refuse_directives(patch)
            with self._lock:
                answer = copy.deepcopy(self._patch_locked(kind, namespace, name, patch))
            return self._json(answer)
        options = await _read_json(request, _OBJECT_TYPES, empty={})
        if not isinstance(options, dict):
            raise _ApiError(400, "DeleteOptions must be a JSON object")
        with self._lock:
            status = self._delete_checked_locked(kind, namespace, name, options)
        return self._json(status)

    async def _create(self, request: web.Request, kind: _Kind, namespace: str) -> web.Response:
        _refuse_dry_run(request)
        body = await _read_json(request, _OBJECT_TYPES)
        _check_type(kind, body)
        with self._lock:
            answer = copy.deepcopy(self._create_locked(kind, namespace, body, post=True))
        return self._json(answer, status=201)

    def _collection_handler(self, kind: _Kind) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info.get("ns")
            if request.method == "POST" and namespace is not None:
                return await self._create(request, kind, namespace)
            try:
                labels = parse_label_selector(request.query.get("labelSelector"))
                fields = parse_field_selector(request.query.get("fieldSelector"))
            except SelectorError as exc:
                return self._status(400, str(exc))
            if _truthy(request.query.get("watch")):
                return await self._watch(request, kind, namespace, labels, fields)
            with self._lock:
                items = [
                    copy.deepcopy(obj)
                    for (resource, ns, _name), obj in sorted(self._objects.items())
                    if resource == kind.resource
                    and (namespace is None or ns == namespace)
                    and labels(obj["metadata"].get("labels") or {})
                    and fields(obj)
                ]
                rv = self._rv
            for item in items:  # the real server omits the items' TypeMeta in a list
                item.pop("kind", None)
                item.pop("apiVersion", None)
            body = {
                "kind": kind.list_kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)},
                "items": items,
            }
            return self._json(body)

        return handle

    async def _watch(
        self,
        request: web.Request,
        kind: _Kind,
        namespace: str | None,
        labels: Callable[[Mapping[str, str]], bool],
        fields: Callable[[JSON], bool],
    ) -> web.StreamResponse:
        rv_text = request.query.get("resourceVersion", "")
        start_rv: int | None = None
        if rv_text not in ("", "0"):
            try:
                start_rv = int(rv_text)
            except ValueError:
                return self._status(400, f"invalid resource version: {rv_text!r}")
        timeout: float | None = self.default_watch_timeout
        if "timeoutSeconds" in request.query:
            try:
                timeout = float(int(request.query["timeoutSeconds"]))
            except ValueError:
                return self._status(400, "invalid timeoutSeconds")
        watch = _Watch(
            kind=kind,
            namespace=namespace,
            labels=labels,
            fields=fields,
            bookmarks=_truthy(request.query.get("allowWatchBookmarks")),
            queue=asyncio.Queue(),
            transport=request.transport,
            client=_bearer_token(request.headers.get("Authorization")),
        )
        deadline = None if timeout is None else time.monotonic() + timeout

        # What the watch starts with, each stamped with when it happened (for a delayed client):
        # the synthetic ADDED events when the watch opens, a replayed event when it was made.
        initial: collections.deque[_Queued] = collections.deque()
        expired: JSON | None = None
        with self._lock:
            if watch.client is not None and watch.client in self._cut_off:
                return _refuse(request)  # cut off since the middleware let it through
            if start_rv is None:
                initial.extend(
                    _Queued("event", ("ADDED", copy.deepcopy(obj)), watch.started)
                    for obj in sorted(
                        self._objects.values(), key=lambda o: int(o["metadata"]["resourceVersion"])
                    )
                    if obj["kind"] == kind.kind
                    and (namespace is None or obj["metadata"]["namespace"] == namespace)
                    and watch.matches(obj)
                )
            elif start_rv < self._floor:
                expired = status_object(
                    410, f"too old resource version: {start_rv} ({self._floor})", "Expired"
                )
            else:
                for event in self._history:
                    if event.rv > start_rv and (seen := watch.translate(event)) is not None:
                        initial.append(_Queued("event", seen, event.at))
            if expired is None:
                self._watches.add(watch)

        response = web.StreamResponse(status=200, headers={"Cache-Control": "no-cache, private"})
        response.content_type = "application/json"
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if expired is not None:
                await response.write(_line("ERROR", expired))
                await response.write_eof()
                return response
            if await self._stream(watch, response, deadline, initial):
                await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away, or the connection was dropped under us
        finally:
            with self._lock:
                self._watches.discard(watch)
        return response

    async def _stream(
        self,
        watch: _Watch,
        response: web.StreamResponse,
        deadline: float | None,
        pending: collections.deque[_Queued],
    ) -> bool:
        """Send events as they fall due until the deadline (True: end cleanly) or a drop (False).

        ``pending`` holds what has happened but is not due yet (the client's watch delay); the
        queue brings new items and the "drop"/"wake" signals, which are not delayed.
        """
        interval = self.bookmark_interval if watch.bookmarks else None
        next_bookmark = None if interval is None else time.monotonic() + interval
        while True:
            await self._send_due(watch, response, pending)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return True
            if next_bookmark is not None and interval is not None and now >= next_bookmark:
                next_bookmark = now + interval
                with self._lock:  # behind every event already queued for this watch
                    self._enqueue(watch, "bookmark", self._rv)
            delay = self.watch_delay(watch.client) if watch.client else 0.0
            due = pending[0].at + delay if pending else None
            waits = [t - now for t in (deadline, next_bookmark, due) if t is not None]
            try:
                if waits:
                    item = await asyncio.wait_for(watch.queue.get(), max(0.0, min(waits)))
                else:
                    item = await watch.queue.get()
            except TimeoutError:
                continue
            if item.kind == "drop":
                return False
            if item.kind != "wake":  # a wake only makes the loop look at the delay again
                pending.append(item)

    async def _send_due(
        self, watch: _Watch, response: web.StreamResponse, pending: collections.deque[_Queued]
    ) -> None:
        """Write every pending item whose time has come, oldest first."""
        while pending:
            delay = self.watch_delay(watch.client) if watch.client else 0.0
            if pending[0].at + delay > time.monotonic():
                return
            item = pending.popleft()
            if item.kind == "event":
                event_type, obj = item.payload
                await response.write(_line(event_type, obj))
            elif item.kind == "bookmark" and watch.bookmarks:
                bookmark = {
                    "kind": watch.kind.kind,
                    "apiVersion": watch.kind.api_version,
                    "metadata": {"resourceVersion": str(item.payload)},
                }
                await response.write(_line("BOOKMARK", bookmark))


# ---------------------------------------------------------------------------------------------
# Requests

# The methods each route family takes (keyed by family and whether the path names a namespace);
# a family not listed (the 404 route) takes any.
_METHODS: dict[tuple[str, bool], frozenset[str]] = {
    ("discovery", False): frozenset({"GET", "HEAD"}),
    ("collection", False): frozenset({"GET", "HEAD"}),  # all namespaces: read-only
    ("collection", True): frozenset({"GET", "HEAD", "POST"}),
    ("item", True): frozenset({"GET", "HEAD", "PUT", "PATCH", "DELETE"}),
}
_ITEM_VERBS = {"GET": "get", "HEAD": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_OBJECT_TYPES = ("application/json",)
_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def _verb(family: str, method: str, query: Mapping[str, str]) -> str:
    """The API verb of a request, as the real server's RequestInfo names it."""
    if family == "collection":
        if method in ("GET", "HEAD"):
            return "watch" if _truthy(query.get("watch")) else "list"
        return {"POST": "create", "DELETE": "deletecollection"}.get(method, "other")
    if family == "item":
        return _ITEM_VERBS.get(method, "other")
    return "discovery" if family == "discovery" else "other"


def _bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header (scheme case-insensitive), else None."""
    scheme, _, token = (header or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _refuse(request: web.Request) -> web.Response:
    """Close the connection without an answer (what the client of a partition sees).

    The response returned is never written: aiohttp finds the transport closing and drops it.
    """
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=503)


def _refuse_dry_run(request: web.Request) -> None:
    if "dryRun" in request.query:
        raise _ApiError(400, "the fake apiserver does not implement dryRun: it would write")


async def _read_json(request: web.Request, types: tuple[str, ...], empty: Any = None) -> Any:
    """The request's JSON body (``empty`` if it has none and that is allowed), or a 4xx."""
    raw = await request.read()
    if not raw and empty is not None:
        return empty
    # No Content-Type: the server's first serializer, JSON (NegotiateInputSerializerForMediaType),
    # which is what the Python client relies on for its creates and replaces.
    given = request.content_type if "Content-Type" in request.headers else "application/json"
    if given not in types:
        accepted = ", ".join(types)
        raise _ApiError(
            415,
            f"the body of the request was in an unknown format - accepted media types include: {accepted}",
        )
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _ApiError(400, f"couldn't get version/kind; json parse error: {exc}") from None


def _refuse_directives(patch: Any) -> None:
    """A strategic merge patch is taken as a merge patch, which its ``$`` directives are not."""
    if isinstance(patch, dict):
        for key, value in patch.items():
            if key.startswith("$"):
                raise _ApiError(
                    400, f"the fake apiserver does not implement strategic-merge directives ({key})"
                )
            _refuse_directives(value)
    elif isinstance(patch, list):
        for value in patch:
            _refuse_directives(value)


_DNS_SUBDOMAIN_ERROR = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def _content(obj: JSON) -> JSON:
    """An object without its kind, apiVersion and metadata: what a write replaces."""
    return {k: v for k, v in obj.items() if k not in _TYPE_AND_META}


def _user_metadata(meta: Mapping[str, Any]) -> JSON:
    """The client-set metadata the server keeps, besides name, namespace and labels."""
    return {k: copy.deepcopy(meta[k]) for k in _USER_METADATA if meta.get(k)}


def _check_type(kind: _Kind, body: Any) -> None:
    """A body must be an object of the URL's kind (its kind/apiVersion may be left out)."""
    if not isinstance(body, dict):
        raise _ApiError(400, f"the body of the request is not a JSON object: {type(body).__name__}")
    if body.get("apiVersion") not in (None, kind.api_version):
        raise _ApiError(
            400,
            f"the API version in the data ({body['apiVersion']}) does not match the expected API version "
            f"({kind.api_version})",
        )
    if body.get("kind") not in (None, kind.kind):
        raise _ApiError(
            400, f"the kind in the data ({body['kind']}) does not match the expected kind ({kind.kind})"
        )
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        raise _undecodable(kind, "metadata is not an object")
    for key in ("name", "namespace", "generateName", "resourceVersion", "uid"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _undecodable(
                kind, f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key} of type string"
            )


def _check_identity(kind: _Kind, namespace: str, name: str, body: JSON) -> None:
    """An update's body names the URL's object (``checkName`` of the update handler)."""
    meta = body.get("metadata") or {}
    if (meta.get("name") or "") != name:
        raise _ApiError(
            400,
            f"the name of the object ({meta.get('name') or ''}) does not match the name on the URL ({name})",
        )
    if meta.get("namespace") and meta["namespace"] != namespace:
        raise _ApiError(
            400,
            f"the namespace of the object ({meta['namespace']}) does not match the namespace on the request "
            f"({namespace})",
        )


def _check_uid(kind: _Kind, name: str, uid: Any, prev: JSON) -> None:
    """A uid precondition (a body's metadata.uid, DeleteOptions.preconditions.uid)."""
    have = prev["metadata"].get("uid", "")
    if uid and uid != have:
        raise _conflict(
            kind, name, f"Precondition failed: UID in precondition: {uid}, UID in object meta: {have}"
        )


def _parse_rv(text: Any) -> int:
    try:
        return int(str(text), 10)
    except ValueError:
        raise _ApiError(400, f"invalid resource version: {json.dumps(text)}") from None


def _string_map(kind: _Kind, path: str, value: Any) -> dict[str, str]:
    """A ``map[string]string`` field, or the 400 the decoder gives for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _undecodable(kind, f"json: cannot unmarshal {path} into Go value of type map[string]string")
    return dict(value)


def _normalize_micro_times(kind: _Kind, spec: Mapping[str, Any]) -> JSON:
    """A copy of ``spec`` with its MicroTimes rendered as the server stores them (``ValueError``
    for one it cannot decode); ``null`` fields are left out, as the server omits them."""
    result = {k: copy.deepcopy(v) for k, v in spec.items() if v is not None}
    for name in kind.micro_times:
        if name in result:
            result[name] = micro_time(result[name])
    return result


def _check_lease_spec(name: str, spec: JSON) -> None:
    """``validation.ValidateLeaseSpec``'s checks of the numbers (422) and their Go types (400)."""
    for path, minimum, rule in (
        ("leaseDurationSeconds", 1, "must be greater than 0"),
        ("leaseTransitions", 0, "must be greater than or equal to 0"),
    ):
        value = spec.get(path)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise _undecodable(
                LEASES,
                f"json: cannot unmarshal {json.dumps(value)} into Go struct field LeaseSpec.spec.{path} "
                "of type int32",
            )
        if value < minimum:
            raise _invalid(LEASES, name, f"spec.{path}", f"Invalid value: {value}: {rule}")


def _split_body(kind: _Kind, name: str, body: JSON) -> tuple[JSON, dict[str, str], JSON]:
    """A checked body as what the store keeps: (content, labels, other user metadata)."""
    _check_type(kind, body)
    meta = body.get("metadata") or {}
    labels = _string_map(kind, "metadata.labels", meta.get("labels"))
    extra = _user_metadata(meta)
    if "annotations" in extra:
        extra["annotations"] = _string_map(kind, "metadata.annotations", extra["annotations"])
    content = {k: copy.deepcopy(v) for k, v in _content(body).items() if v is not None}
    for path in kind.string_maps:
        if path in content:
            content[path] = _string_map(kind, path, content[path])
    if kind.micro_times and "spec" in content:
        if not isinstance(content["spec"], dict):
            raise _undecodable(kind, "spec is not an object")
        try:
            content["spec"] = _normalize_micro_times(kind, content["spec"])
        except ValueError as exc:
            raise _undecodable(kind, str(exc)) from None
    if kind is LEASES:
        _check_lease_spec(name, content.get("spec") or {})
    return content, labels, extra


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _line(event_type: str, obj: JSON) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


def _api_group(group: str) -> JSON:
    """An ``APIGroup`` entry: the double serves v1 of every group."""
    version = {"groupVersion": f"{group}/v1", "version": "v1"}
    return {"name": group, "versions": [version], "preferredVersion": version}


def _resource_list(group_version: str) -> JSON:
    """The ``APIResourceList`` of a group version: the kinds the double serves in it."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {
                "name": kind.resource,
                "singularName": kind.kind.lower(),
                "namespaced": True,
                "kind": kind.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                "shortNames": list(kind.short_names),
            }
            for kind in _KINDS.values()
            if kind.api_version == group_version
        ],
    }
