"""An in-process Kubernetes API-server double for tests: ConfigMaps and EndpointSlices over HTTP.

It speaks the real wire protocol that the official ``kubernetes`` Python client (and any other
client) uses, so code under test can be pointed at it through an ordinary kubeconfig:

* ``GET /api/v1/namespaces/{ns}/configmaps[/{name}]`` and
  ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices[/{name}]`` (plus the
  all-namespaces collections ``/api/v1/configmaps`` and ``/apis/discovery.k8s.io/v1/endpointslices``):
  list (``kind: ConfigMapList`` / ``EndpointSliceList``, ``metadata.resourceVersion``; items carry
  no ``kind``/``apiVersion``, as the real server omits them) and get (with them), with
  ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``,
  comma-joined ANDs) and ``fieldSelector`` (``metadata.name`` / ``metadata.namespace`` with
  ``=``, ``==``, ``!=``).
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

* ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/discovery.k8s.io[/v1]``: minimal
  discovery answers. Anything else is a ``404`` ``Status``; non-GET methods get ``405``.

``resourceVersion`` is one global counter (as etcd's revision), rendered as a string; every
change (create, update, delete) takes the next value. A put that changes nothing is a no-op (no
new version, no event), as on the real server. Errors are ``Status`` objects with the real
``reason`` for their code. Requests need ``Authorization: Bearer <token>`` when
``require_auth`` (the default; the scheme is case-insensitive, as in RFC 7235 and the real
server, and the in-cluster loader of the Python client sends ``bearer``): the kubeconfig
written by ``kubeconfig()`` carries it; anything else gets ``401 Unauthorized``. With an
``ssl_context`` (a server certificate loaded) it serves HTTPS instead of plain HTTP, as a
real API server does for a pod's service account.

The server runs on its own event loop in a daemon thread, so blocking test code, other threads
and other processes can all use it. Every control method (``put_*``, ``delete_*``,
``drop_watches``, ``fail_requests``, ``set_down``, ``compact``, ``send_bookmark``, counters) is
thread-safe; do not call the blocking ones (``drop_watches``, ``set_down``, ``stop``) from the
double's own loop (they raise ``RuntimeError`` there).

Typical use::

    with FakeApiServer() as api:
        api.put_endpointslice("prod", "users-abc", "users", [endpoint("10.0.0.1")], [port()])
        api.kubeconfig(tmp_path / "kubeconfig")
        ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support import LoopThread
from tests.support import wait_until as _wait_until

JSON = dict[str, Any]

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

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


CONFIGMAPS = _Kind("configmaps", "ConfigMap", "v1", ("cm",))
ENDPOINTSLICES = _Kind("endpointslices", "EndpointSlice", "discovery.k8s.io/v1")
_KINDS = {k.resource: k for k in (CONFIGMAPS, ENDPOINTSLICES)}


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
            if op == "in":
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                requirements.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        elif match := _CMP_RE.match(part):
            key, op, value = match.groups()
            if op == "!=":
                requirements.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                requirements.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := _EXISTS_RE.match(part):
            negate, key = match.groups()
            if negate:
                requirements.append(lambda labels, k=key: k not in labels)
            else:
                requirements.append(lambda labels, k=key: k in labels)
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
        if op == "!=":
            checks.append(lambda obj, a=attr, v=value: obj["metadata"].get(a) != v)
        else:
            checks.append(lambda obj, a=attr, v=value: obj["metadata"].get(a) == v)
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class RequestRecord:
    """One request the double received (kept for assertions)."""

    method: str
    path: str
    verb: str  # "list", "watch", "get", "discovery" or "other"
    resource: str | None  # "configmaps", "endpointslices" or None
    namespace: str | None
    query: dict[str, str]
    authorization: str | None
    at: float


@dataclass(frozen=True)
class _Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    kind: _Kind
    namespace: str
    obj: JSON  # the new state (for DELETED: the last state, with the deletion's resourceVersion)
    prev: JSON | None  # the state before this change (None for ADDED)


@dataclass(eq=False)
class _Watch:
    kind: _Kind
    namespace: str | None
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[JSON], bool]
    bookmarks: bool
    queue: asyncio.Queue[tuple[str, Any]]
    transport: asyncio.BaseTransport | None
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

    def kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig (cluster ``url``, bearer token user, current-context); it carries no
        CA, so it is for the plain-HTTP double."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
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

    def get_object(self, resource: str, namespace: str, name: str) -> JSON | None:
        """A copy of a stored object (``resource``: "configmaps" or "endpointslices")."""
        with self._lock:
            obj = self._objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _put(self, kind: _Kind, namespace: str, name: str, body: JSON, labels: dict[str, str]) -> JSON:
        key = (kind.resource, namespace, name)
        with self._lock:
            prev = self._objects.get(key)
            if prev is not None:
                unchanged = (prev["metadata"].get("labels") or {}) == labels and all(
                    prev.get(k) == v for k, v in body.items()
                )
                if unchanged:
                    return copy.deepcopy(prev)
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
            obj: JSON = {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}
            obj.update(copy.deepcopy(body))
            self._objects[key] = obj
            self._record(_Event(self._rv, "MODIFIED" if prev else "ADDED", kind, namespace, obj, prev))
            return copy.deepcopy(obj)

    def _delete(self, kind: _Kind, namespace: str, name: str) -> JSON | None:
        with self._lock:
            prev = self._objects.pop((kind.resource, namespace, name), None)
            if prev is None:
                return None
            self._rv += 1
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(self._rv)
            self._record(_Event(self._rv, "DELETED", kind, namespace, gone, prev))
            return copy.deepcopy(gone)

    def _record(self, event: _Event) -> None:
        """Append to the history and fan out to live watches. Caller holds the lock."""
        self._history.append(event)
        while len(self._history) > self.history_limit:
            self._floor = self._history.popleft().rv
        for watch in self._watches:
            seen = watch.translate(event)
            if seen is not None:
                self._enqueue(watch, ("event", seen))

    def _enqueue(self, watch: _Watch, item: tuple[str, Any]) -> None:
        """Queue an item for a watch handler, in lock order. Caller holds the lock."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(watch.queue.put_nowait, item)

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
                    self._enqueue(watch, ("bookmark", self._rv))
                    count += 1
            return count

    @property
    def active_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def watch_count(self, resource: str | None = None) -> int:
        """How many watch streams are open now (optionally of one resource)."""
        with self._lock:
            return sum(1 for w in self._watches if resource is None or w.kind.resource == resource)

    def wait_for_watches(self, count: int = 1, timeout: float = 5.0, resource: str | None = None) -> bool:
        """Poll until at least ``count`` watch streams are open; return whether they are."""
        return wait_until(lambda: self.watch_count(resource) >= count, timeout)

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
        "discovery") with ``status`` and a ``Status`` body; ``retry_after`` adds that header."""
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

    def count(self, verb: str | None = None, resource: str | None = None, path: str | None = None) -> int:
        """How many requests matched all the given filters (verb: list/watch/get/discovery/other)."""
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (verb is None or r.verb == verb)
                and (resource is None or r.resource == resource)
                and (path is None or r.path == path)
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

    def _run_on_loop(self, coro: Any, timeout: float) -> Any:
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
        router.add_route("*", "/apis/discovery.k8s.io", self._handle_discovery_group, name="discovery:group")
        router.add_route("*", "/apis/discovery.k8s.io/v1", self._handle_discovery_v1, name="discovery:dv1")
        for kind, prefix in ((CONFIGMAPS, "/api/v1"), (ENDPOINTSLICES, "/apis/discovery.k8s.io/v1")):
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

    async def _drop_watches(self) -> int:
        with self._lock:
            watches = list(self._watches)
            self._watches.clear()
        for watch in watches:
            watch.queue.put_nowait(("drop", None))
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
        if family == "collection":
            verb = "watch" if _truthy(request.query.get("watch")) else "list"
        elif family == "item":
            verb = "get"
        elif family == "discovery":
            verb = "discovery"
        else:
            verb = "other"
        record = RequestRecord(
            method=request.method,
            path=request.path,
            verb=verb,
            resource=resource,
            namespace=request.match_info.get("ns"),
            query=dict(request.query),
            authorization=request.headers.get("Authorization"),
            at=time.monotonic(),
        )
        with self._lock:
            self._requests.append(record)
            failure = self._take_failure(verb)
        if failure is not None:
            headers = {"Retry-After": str(failure.retry_after)} if failure.retry_after is not None else None
            body = status_object(failure.status, failure.message, failure.reason)
            return self._json(body, status=failure.status, headers=headers)
        if self.require_auth and not self._authorized(request.headers.get("Authorization")):
            return self._status(401, "Unauthorized")
        if request.method not in ("GET", "HEAD") and family != "other":
            return self._status(405, "the server does not allow this method on the requested resource")
        response: web.StreamResponse = await handler(request)
        return response

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and token == self.token

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
        return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": [_discovery_group()]})

    async def _handle_discovery_group(self, request: web.Request) -> web.StreamResponse:
        return self._json({"kind": "APIGroup", "apiVersion": "v1", **_discovery_group()})

    async def _handle_api_v1(self, request: web.Request) -> web.StreamResponse:
        return self._json(_resource_list("v1", CONFIGMAPS))

    async def _handle_discovery_v1(self, request: web.Request) -> web.StreamResponse:
        return self._json(_resource_list("discovery.k8s.io/v1", ENDPOINTSLICES))

    def _item_handler(self, kind: _Kind) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace, name = request.match_info["ns"], request.match_info["name"]
            with self._lock:
                obj = copy.deepcopy(self._objects.get((kind.resource, namespace, name)))
            if obj is None:
                return self._status(
                    404, f'{kind.resource} "{name}" not found', details={"name": name, "kind": kind.resource}
                )
            return self._json(obj)

        return handle

    def _collection_handler(self, kind: _Kind) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            namespace = request.match_info.get("ns")
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
        )
        deadline = None if timeout is None else time.monotonic() + timeout

        initial: list[tuple[str, JSON]] = []
        expired: JSON | None = None
        with self._lock:
            if start_rv is None:
                initial = [
                    ("ADDED", copy.deepcopy(obj))
                    for obj in sorted(
                        self._objects.values(), key=lambda o: int(o["metadata"]["resourceVersion"])
                    )
                    if obj["kind"] == kind.kind
                    and (namespace is None or obj["metadata"]["namespace"] == namespace)
                    and watch.matches(obj)
                ]
            elif start_rv < self._floor:
                expired = status_object(
                    410, f"too old resource version: {start_rv} ({self._floor})", "Expired"
                )
            else:
                for event in self._history:
                    if event.rv > start_rv and (seen := watch.translate(event)) is not None:
                        initial.append(seen)
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
            for event_type, obj in initial:
                await response.write(_line(event_type, obj))
            if await self._stream(watch, response, deadline):
                await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away, or the connection was dropped under us
        finally:
            with self._lock:
                self._watches.discard(watch)
        return response

    async def _stream(self, watch: _Watch, response: web.StreamResponse, deadline: float | None) -> bool:
        """Send queued events until the deadline (True: end cleanly) or a drop (False)."""
        interval = self.bookmark_interval if watch.bookmarks else None
        next_bookmark = None if interval is None else time.monotonic() + interval
        while True:
            now = time.monotonic()
            waits = [t - now for t in (deadline, next_bookmark) if t is not None]
            try:
                if waits:
                    kind, payload = await asyncio.wait_for(watch.queue.get(), max(0.0, min(waits)))
                else:
                    kind, payload = await watch.queue.get()
            except TimeoutError:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return True
                if next_bookmark is not None and interval is not None and now >= next_bookmark:
                    next_bookmark = now + interval
                    with self._lock:  # behind every event already queued for this watch
                        self._enqueue(watch, ("bookmark", self._rv))
                continue
            if kind == "drop":
                return False
            if kind == "bookmark":
                if watch.bookmarks:
                    bookmark = {
                        "kind": watch.kind.kind,
                        "apiVersion": watch.kind.api_version,
                        "metadata": {"resourceVersion": str(payload)},
                    }
                    await response.write(_line("BOOKMARK", bookmark))
            else:
                event_type, obj = payload
                await response.write(_line(event_type, obj))


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def _line(event_type: str, obj: JSON) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


def _discovery_group() -> JSON:
    version = {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}
    return {"name": "discovery.k8s.io", "versions": [version], "preferredVersion": version}


def _resource_list(group_version: str, kind: _Kind) -> JSON:
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
                "verbs": ["get", "list", "watch"],
                "shortNames": list(kind.short_names),
            }
        ],
    }
