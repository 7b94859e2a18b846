"""The backend fence: a backend pod refuses the writes its shard group may not accept now.

The gateway routes every write to the group that owns its key; the fence is the other side of
that rule, run inside each backend pod (an aiohttp middleware or an ASGI wrapper). It never
trusts what a gateway says (``X-Shard-*`` headers): it reads the shard state itself (the state
ConfigMap, or the state file; ``gateway.shardstate``) and judges each write with the gateway's
own functions (``is_write``, ``View.write_owner``), so both sides apply one rule.

Why a lease: a hand-off's leader writes a new state and then waits until every pod either
reports that state (the state endpoint below) or can no longer accept writes on an older one.
A fence that cannot read the state (API server down, network cut) does not know whether a
newer state exists, so it accepts writes only while its view was *confirmed* by a direct read
(a linearizable GET of the ConfigMap, or a read of the file) less than ``fence_lease_seconds``
ago. The leader's barrier waits longer than the lease (``barrier_timeout_seconds``), so a pod
nobody can reach has stopped accepting writes on its old view before the barrier gives up.

    fence = Fence.from_configmap("shardgate-shards", namespace="shards", group="group-2")
    fence.install(app)      # aiohttp
    app = fence.wrap(app)   # ASGI (FastAPI, Starlette)

Answers the fence makes itself carry ``X-Shard-Fence: <code>`` so that a gateway can tell a
fence's 421 from one of the application's own. ``GET /.well-known/shardgate/fence`` answers
the fence's state (``?generation=N`` above the held one reads the source at once first).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, quote

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.config import GroupConfig, ShardConfig
from gateway.proxy.http import valid_request_id
from gateway.router import MISSING_KEY, REPEATED_KEY, Refusal, is_write
from gateway.settings import SERVICE_ACCOUNT_DIR, env_name, pod_namespace
from gateway.shardstate import (
    STATE_KEY,
    Moving,
    ShardState,
    StateError,
    View,
    state_configmap_name,
    state_file_path,
)
from gateway.tasks import cancel_and_wait, log_if_it_fails, sleep_or_wake
from gateway.topology import Topology, TopologyBuilder

if TYPE_CHECKING:
    from kubernetes import client

    from gateway.discovery.kubernetes import RawObject, ResourceWatcher, WatchStatus, WatchTiming

__all__ = [
    "FENCE_HEADER",
    "GROUP_ENV",
    "STATE_PATH",
    "Accept",
    "Answer",
    "Fence",
    "FencedApp",
    "InFlight",
    "Refuse",
    "Ticket",
    "Verdict",
    "decide",
    "default_namespace",
]

log = logging.getLogger("shardgate.fence")

STATE_PATH = "/.well-known/shardgate/fence"
FENCE_HEADER = "X-Shard-Fence"
GROUP_ENV = "SHARDGATE_GROUP"
UNCONFIRMED = "shard_state_unconfirmed"
STATE_CODE = "state"  # the X-Shard-Fence value of the state endpoint's answers

MIN_READ_SPACING = 0.05  # seconds between two reads of the state, however often one is asked for
MAX_CONFIRM_INTERVAL = 10.0  # a ConfigMap's confirmation reads: every min(lease / 6, this)
NO_VIEW_INTERVAL = 1.0  # until a first view is held: nothing is accepted, so retry sooner
FILE_POLL_INTERVAL = 0.5
REFRESH_WAIT = 2.0  # ?generation=N waits at most this long for a fresh read
# A read of the ConfigMap (connect, read): a slower answer confirms only its send time anyway.
GET_TIMEOUT = (2.0, 5.0)
_EXPIRY_SLACK = 0.01  # the lease-expiry timer fires just after the lease ran out, not at it


# ---------------------------------------------------------------------------------------------
# The decision: pure, over one view


HeaderValues = Callable[[bytes], list[bytes]]  # lower-case field name -> its raw values, in order


@dataclass(frozen=True, slots=True)
class Accept:
    """A write this group may take: counted in flight under its raw key."""

    key: bytes


@dataclass(frozen=True, slots=True)
class Refuse:
    """A write refused before the application sees it."""

    status: int
    code: str
    detail: str
    owner: str | None = None  # 421: the group that may take it (after the hand-off, if moving)
    retry_after: bool = False


Verdict = Accept | Refuse | None  # None: not a write, passed on


@cache
def default_routing() -> Topology:
    """The default routing rules, for the time before any view is held: which requests are
    writes (and so refused as unconfirmed) is then all the fence can tell."""
    placeholder = GroupConfig(name="no-view-yet", endpoints=("127.0.0.1:9",))
    return TopologyBuilder().build(ShardConfig(version=1, groups=(placeholder,)))


# Before its first view the fence cannot know the config's write methods or operation header:
# only these methods, with no default operation header saying "write", are let through as reads.
SAFE_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE"))


def _writes_under(routing: Topology, method: bytes, headers: HeaderValues) -> bool:
    """Whether ``routing``'s rules make the request a write (the gateway's ``is_write``)."""
    operation_header = routing.operation_header
    operations = headers(operation_header) if operation_header is not None else []
    return is_write(routing, method, operations[-1] if operations else None)


def decide(view: View | None, group: str, confirmed: bool, method: bytes, headers: HeaderValues) -> Verdict:
    """What the fence does with one request, under ``view`` (None before the first one)."""
    unconfirmed = Refuse(
        503,
        UNCONFIRMED,
        "the fence could not confirm its view of the shard state within its lease",
        retry_after=True,
    )
    if view is None:
        safe = method in SAFE_METHODS and not _writes_under(default_routing(), method, headers)
        return None if safe else unconfirmed
    routing = view.routing_topology
    write = _writes_under(routing, method, headers)
    if not write and view.every_key_moves and view.incoming is not None:
        # The config handed to reads writes differently: a write under its rules is moving too.
        if _writes_under(view.incoming, method, headers):
            return Refuse(
                421, "shard_moving", "the hand-off under way changes which requests are writes", group, True
            )
    if not write:
        return None
    if not confirmed:
        return unconfirmed
    keys = headers(routing.key_header)
    if len(keys) > 1:
        return _refusal(REPEATED_KEY)
    owner = view.write_owner(keys[0]) if keys else MISSING_KEY
    if isinstance(owner, Refusal):
        return _refusal(owner)
    if isinstance(owner, Moving):
        if owner.source == owner.target:  # the hand-off changes how writes are read
            detail = "the hand-off under way changes the routing rules: retry once it ends"
        else:
            detail = f"the key is moving from {owner.source} to {owner.target}: retry once the hand-off ends"
        return Refuse(421, "shard_moving", detail, owner.target, retry_after=True)
    if owner != group:
        return Refuse(421, "misdirected_write", f"the key belongs to {owner}, not {group}", owner)
    return Accept(keys[0])


def _refusal(refusal: Refusal) -> Refuse:
    return Refuse(refusal.status, refusal.code, refusal.detail, retry_after=refusal.retry_after is not None)


# ---------------------------------------------------------------------------------------------
# Answers and writes in flight


@dataclass(frozen=True, slots=True)
class Answer:
    """A response the fence makes itself (a refusal or the state endpoint's)."""

    status: int
    code: str  # the X-Shard-Fence value
    body: bytes
    request_id: str | None
    retry_after: bool = False

    def header_pairs(self) -> list[tuple[str, str]]:
        pairs = [
            ("Content-Type", "application/json"),
            (FENCE_HEADER, self.code),
            ("Cache-Control", "no-store"),
        ]
        if self.retry_after:
            pairs.append(("Retry-After", "1"))
        if self.request_id is not None:
            pairs.append(("X-Request-ID", self.request_id))
        return pairs


def _json_bytes(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def request_id_of(values: Sequence[bytes]) -> str | None:
    """The request's ``X-Request-ID`` when it sent exactly one valid one (the gateway's rule)."""
    if len(values) == 1 and valid_request_id(values[0]):
        return values[0].decode("ascii")
    return None


class Ticket:
    """One accepted write, counted until ``release()`` (idempotent)."""

    __slots__ = ("_open", "_writes", "accepted_at", "key", "lease")

    def __init__(self, writes: InFlight, key: bytes, accepted_at: float, lease: float) -> None:
        self._writes = writes
        self.key = key
        self.accepted_at = accepted_at  # monotonic
        self.lease = lease  # of the view it was accepted under
        self._open = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self._writes.remove(self)


class InFlight:
    """The raw keys of the writes accepted and not yet finished (a multiset)."""

    def __init__(self, group: str = "") -> None:
        self._group = group
        self._keys: collections.Counter[bytes] = collections.Counter()
        self.count = 0

    def add(self, key: bytes, accepted_at: float = 0.0, lease: float = float("inf")) -> Ticket:
        self._keys[key] += 1
        self.count += 1
        return Ticket(self, key, accepted_at, lease)

    def remove(self, ticket: Ticket) -> None:
        self.count -= 1
        left = self._keys[ticket.key] - 1
        if left:
            self._keys[ticket.key] = left
        else:
            del self._keys[ticket.key]
        took = time.monotonic() - ticket.accepted_at
        if took > ticket.lease:
            # The hand-off's barrier counts a silent pod's writes finished one lease after its
            # own lease ran out: a write that took longer may overlap the key's next owner.
            log.warning(
                "fence %s: a write finished %.1fs after it was accepted, beyond the lease (%.1fs)",
                self._group,
                took,
                ticket.lease,
            )

    def moving(self, view: View | None) -> int:
        """How many of them are for keys that ``view`` says are moving (the barrier's count)."""
        if view is None or view.incoming is None:
            return 0
        return sum(n for key, n in self._keys.items() if isinstance(view.write_owner(key), Moving))


# ---------------------------------------------------------------------------------------------
# Where the state comes from


class SourceUnavailable(Exception):
    """The state could not be read (unreachable, missing): nothing is confirmed."""


class StateSource(Protocol):
    name: str  # for logs and the state endpoint

    def interval(self, lease: float | None) -> float:
        """Seconds between confirmation reads, for a view with ``lease`` (None: no view yet)."""

    async def start(self, changed: Callable[[str], None]) -> None:
        """Begin pushing new state documents to ``changed`` (on the event loop), if it can."""

    async def read(self) -> str:
        """The state document, read directly; SourceUnavailable if it cannot be."""

    def stop(self) -> None: ...


class FileSource:
    """The state file: polled; every successful read confirms."""

    def __init__(self, path: str, poll_interval: float) -> None:
        self.path = path
        self.name = f"file {path}"
        self._poll_interval = poll_interval

    def interval(self, lease: float | None) -> float:
        return self._poll_interval

    async def start(self, changed: Callable[[str], None]) -> None:
        """Nothing pushes changes of a file: the polls find them."""

    async def read(self) -> str:
        try:
            return await asyncio.to_thread(Path(self.path).read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceUnavailable(f"cannot read {self.path}: {exc}") from None

    def stop(self) -> None:
        pass


class ConfigMapSource:
    """The state ConfigMap: confirmed by GETs (quorum reads), changes seen by list-then-watch."""

    def __init__(
        self,
        name: str,
        namespace: str,
        api_factory: Callable[[], client.ApiClient],
        confirm_interval: float | None,
        watch_timing: WatchTiming | None,
    ) -> None:
        self.configmap = name
        self.namespace = namespace
        self.name = f"configmap {namespace}/{name}"
        self._api_factory = api_factory
        self._confirm_interval = confirm_interval
        self._watch_timing = watch_timing
        self._get: Callable[..., Any] | None = None
        self._watcher: ResourceWatcher | None = None

    def interval(self, lease: float | None) -> float:
        if self._confirm_interval is not None:
            return self._confirm_interval
        if lease is None:
            return NO_VIEW_INTERVAL
        return min(lease / 6, MAX_CONFIRM_INTERVAL)

    async def start(self, changed: Callable[[str], None]) -> None:
        # Imported here: a backend that fences on a file never loads the Kubernetes client.
        from gateway.discovery.kubernetes import CONFIGMAPS, ResourceWatcher, WatchTiming, list_call

        loop = asyncio.get_running_loop()
        # Two clients, as the gateway's watches have: a long watch never holds up a GET.
        get_api, watch_api = await asyncio.to_thread(lambda: (self._api_factory(), self._api_factory()))
        item_path = f"/api/v1/namespaces/{{namespace}}/configmaps/{quote(self.configmap, safe='')}"
        self._get = list_call(get_api, (item_path, "V1ConfigMap"))

        def deliver(items: dict[str, RawObject]) -> None:  # on the watch's thread
            text = _state_text(items.get(self.configmap))
            if text is not None and not loop.is_closed():
                loop.call_soon_threadsafe(changed, text)

        self._watcher = ResourceWatcher(
            f"configmap/{self.configmap}",  # named as the gateway's other watches are
            list_call(watch_api, CONFIGMAPS),
            {"namespace": self.namespace, "field_selector": f"metadata.name={self.configmap}"},
            deliver,
            self._watch_timing or WatchTiming(backoff_max=MAX_CONFIRM_INTERVAL),
        )
        self._watcher.start()

    async def read(self) -> str:
        get = self._get
        if get is None:
            raise SourceUnavailable("not started")
        return await asyncio.to_thread(self._read_blocking, get)

    def _read_blocking(self, get: Callable[..., Any]) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            response = get(self.namespace, _request_timeout=GET_TIMEOUT)
            try:
                document = json.loads(response.data)
            finally:
                response.release_conn()
        except ApiException as exc:
            if exc.status == 404:
                raise SourceUnavailable(f"{self.name} not found") from None
            raise SourceUnavailable(f"API server answered {exc.status}: {exc.reason}") from None
        except Exception as exc:  # refused, reset, timed out, not JSON: all mean "not read"
            raise SourceUnavailable(f"{type(exc).__name__}: {exc}") from None
        text = _state_text(document)
        if text is None:
            raise SourceUnavailable(f"{self.name} has no {STATE_KEY!r} key")
        return text

    @property
    def watch_status(self) -> WatchStatus | None:
        """The state watch's status (a gateway shows it beside its other watches)."""
        return self._watcher.status if self._watcher is not None else None

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._get = None


def _state_text(obj: object) -> str | None:
    data = obj.get("data") if isinstance(obj, dict) else None
    text = data.get(STATE_KEY) if isinstance(data, dict) else None
    return text if isinstance(text, str) else None


def default_namespace() -> str:
    """The namespace the gateway would use (``gateway.settings``): SHARDGATE_NAMESPACE, else the
    service account's ``namespace`` file (SHARDGATE_SERVICE_ACCOUNT_DIR), else ``default``."""
    explicit = os.environ.get(env_name("namespace"))
    if explicit:
        return explicit
    return pod_namespace(os.environ.get(env_name("service_account_dir")) or SERVICE_ACCOUNT_DIR)


def _group_or_env(group: str | None) -> str:
    group = group or os.environ.get(GROUP_ENV)
    if not group:
        raise ValueError(f"the fence needs its shard group: pass group= or set {GROUP_ENV}")
    return group


# ---------------------------------------------------------------------------------------------
# The fence


class StateFollower:
    """Follows the shard state from a source: the newest view read (never an older one) and
    its lease (confirmed by direct reads only). The fence judges writes on it; a gateway routes
    on it. Listeners hear of every new view, and of the lease running out and being confirmed
    again, on the event loop."""

    def __init__(self, source: StateSource, label: str) -> None:
        self.source = source
        self.label = label  # for logs: "fence group-2", "gateway"
        self._listeners: list[Callable[[View], None]] = []
        self._confirmation_listeners: list[Callable[[bool], None]] = []
        self._told_confirmed: bool | None = None  # what they were last told
        self._view: View | None = None
        self._confirmed_at: float | None = None  # monotonic send time of the last confirming read
        # The lease the view held is judged by: its own once a direct read confirmed it; for a
        # view only the watch brought, the longer of its own and the one before (a commit that
        # lowered the lease does not lapse a view a read confirmed a moment ago).
        self._lease = 0.0
        self._lapsed = False  # the lease ran out (logged) and no read has confirmed since
        self._problem: str | None = None  # the last problem logged, so a lasting one logs once
        self._started = False  # set at once by start(), so that two concurrent starts start once
        self._loop_task: asyncio.Task[None] | None = None
        self._reading: tuple[asyncio.Task[None], float] | None = None  # the read, its send time
        self._offers: set[asyncio.Task[None]] = set()
        self._expiry: asyncio.TimerHandle | None = None
        # Made again by start(): asyncio primitives belong to the loop that first waits on them.
        self._apply_lock = asyncio.Lock()
        self._wake = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._loop_task is not None

    async def start(self) -> None:
        """Start reading the state (idempotent). Writes are refused until a read confirms one."""
        if self._started:
            return
        self._started = True
        try:
            self._apply_lock, self._wake = asyncio.Lock(), asyncio.Event()
            await self.source.start(self._pushed)
        except BaseException:
            self._started = False
            raise
        loop_task = asyncio.create_task(self._confirm_loop(), name=f"{self.label} state")
        self._loop_task = log_if_it_fails(loop_task, f"{self.label}: following the shard state", log)

    async def stop(self) -> None:
        """Stop reading (idempotent); the view held stays, and its lease runs out."""
        task, self._loop_task = self._loop_task, None
        if task is None:
            return
        self._started = False
        self.source.stop()
        pending = [task, *self._offers]
        if self._reading is not None:
            pending.append(self._reading[0])
            self._reading = None
        for item in pending:
            await cancel_and_wait(item)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # -- the view and its lease -----------------------------------------------------------------

    @property
    def view(self) -> View | None:
        return self._view

    def confirmed(self, now: float | None = None) -> bool:
        view, at = self._view, self._confirmed_at
        if view is None or at is None:
            return False
        return (time.monotonic() if now is None else now) - at <= self._lease

    async def _confirm_loop(self) -> None:
        while True:
            await self._read_after(time.monotonic())
            view = self._view
            interval = self.source.interval(view.lease if view is not None else None)
            await sleep_or_wake(self._wake, interval)
            self._wake.clear()
            # What bounds the reads to one per MIN_READ_SPACING plus a round trip, however many
            # wakes come (a burst of 421s at the gateways); it delays by as much the GET that
            # confirms a view the watch brought.
            await asyncio.sleep(MIN_READ_SPACING)

    async def _read_after(self, asked: float) -> None:
        """Wait for a read of the source sent at or after ``asked``: one read at a time, shared
        by the confirmation loop and every ``?generation=`` request (joined when it qualifies)."""
        while True:
            reading = self._reading
            if reading is None or reading[0].done():
                sent = time.monotonic()
                reading = self._reading = (asyncio.create_task(self._read_once(sent)), sent)
            task, sent = reading
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and not (current is not None and current.cancelling()):
                    return  # the fence stopped under a waiting request: stop waiting, answer
                raise
            if sent >= asked:
                return

    async def _read_once(self, sent: float) -> None:
        held = self._view.generation if self._view is not None else 0
        try:
            text = await self.source.read()
        except SourceUnavailable as exc:
            self._report(f"{self.source.name}: {exc}")
            return
        await self._guarded_offer(text, sent, held)

    def _pushed(self, text: str) -> None:
        """A document from the watch (not a linearizable read: it applies, it never confirms)."""
        task = asyncio.create_task(self._guarded_offer(text, None, 0))
        self._offers.add(task)
        task.add_done_callback(self._offers.discard)

    async def _guarded_offer(self, text: str, sent: float | None, held_at_send: int) -> None:
        try:
            await self._offer(text, sent, held_at_send)
        except Exception:  # a bug must not end the reads: the lease then refuses writes in time
            log.exception("%s: could not apply the shard state", self.label)

    async def _offer(self, text: str, sent: float | None, held_at_send: int) -> None:
        """Apply ``text`` if it is a newer state; a direct read (``sent``) also confirms the view."""
        try:
            state = ShardState.from_json(text)
        except StateError as exc:
            self._report(f"{self.source.name}: {exc}; keeping generation {self._generation()}")
            return
        if sent is not None and state.generation < held_at_send:
            # A read can return an older state than one already seen only if the state was
            # replaced by hand: the view held is then not what the source says.
            self._report(
                f"{self.source.name}: generation {state.generation} is older than the one held"
                f" ({held_at_send}); not confirmed"
            )
            return
        async with self._apply_lock:
            if self._view is None or state.generation > self._view.generation:
                try:
                    view = await asyncio.to_thread(View.of, state)  # a ring build: ~100 ms
                except StateError as exc:
                    self._report(f"{self.source.name}: {exc}; keeping generation {self._generation()}")
                    return
                self._switch(view, direct=sent is not None)
                if sent is None:
                    self._wake.set()  # confirm the new view with a direct read now
            if sent is not None:
                self._confirm(sent)

    def subscribe(self, listener: Callable[[View], None]) -> None:
        self._listeners.append(listener)

    def subscribe_confirmation(self, listener: Callable[[bool], None]) -> None:
        """``listener(confirmed)`` on every change: whether the view held is within its lease."""
        self._confirmation_listeners.append(listener)

    def _tell_confirmation(self) -> None:
        confirmed = self.confirmed() and not self._lapsed
        if confirmed != self._told_confirmed:
            self._told_confirmed = confirmed
            for listener in self._confirmation_listeners:
                listener(confirmed)

    def read_soon(self) -> None:
        """Read the source now rather than at the next interval (a newer state is likely: a
        fenced pod refused a write). Reads never overlap, and follow each other at most every
        ``MIN_READ_SPACING`` seconds, however often this is called."""
        self._wake.set()

    def _switch(self, view: View, direct: bool) -> None:
        """``view`` is the newest; from a direct read (``direct``: confirmed right after, and
        told then) or from the watch (it confirms nothing, and may come with a shorter lease)."""
        self._view = view
        self._lease = view.lease if direct else max(self._lease, view.lease)
        log.info(
            "%s: applied shard state generation %d (%s, epoch %s, next epoch %s)",
            self.label,
            view.generation,
            view.phase,
            view.epoch,
            view.next_epoch,
        )
        self._arm_expiry()
        for listener in self._listeners:
            listener(view)
        if not direct:
            self._tell_confirmation()

    def _confirm(self, sent: float) -> None:
        first = self._confirmed_at is None
        if self._confirmed_at is None or sent > self._confirmed_at:
            self._confirmed_at = sent
        if self._view is not None:
            self._lease = self._view.lease  # the view in hand, confirmed: judged by its own lease
        self._problem = None
        if not self.confirmed():
            return  # the read took longer than the lease: it confirms nothing now
        if first or self._lapsed:
            log.info(
                "%s: shard state generation %d confirmed%s",
                self.label,
                self._generation(),
                " again: accepting writes" if self._lapsed else "",
            )
        self._lapsed = False
        self._arm_expiry()
        self._tell_confirmation()

    def _arm_expiry(self) -> None:
        """A timer at the moment the lease runs out, so that it is logged when it happens."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        view, at = self._view, self._confirmed_at
        if view is None or at is None or self._lapsed:
            return
        delay = at + self._lease - time.monotonic() + _EXPIRY_SLACK
        self._expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), self._expired)

    def _expired(self) -> None:
        self._expiry = None
        if self.confirmed():
            self._arm_expiry()
            return
        self._lapsed = True
        log.warning(
            "%s: shard state not confirmed for %.1fs (lease %.1fs): refusing writes%s",
            self.label,
            time.monotonic() - (self._confirmed_at or 0.0),
            self._lease,
            f" (last problem: {self._problem})" if self._problem else "",
        )
        self._tell_confirmation()

    def _report(self, problem: str) -> None:
        """Log a problem once while it lasts (the reads repeat every interval)."""
        if problem != self._problem:
            self._problem = problem
            log.warning("%s: %s", self.label, problem)

    def _generation(self) -> int | None:
        return self._view.generation if self._view is not None else None

    @property
    def generation(self) -> int | None:
        """The generation of the view held (None before the first)."""
        return self._generation()

    @property
    def confirmed_at(self) -> float | None:
        """The monotonic send time of the last read that confirmed the view."""
        return self._confirmed_at

    async def refresh(self, generation: int, timeout: float = REFRESH_WAIT) -> None:
        """Read the source at once if ``generation`` is above the one held (bounded wait). The
        caller's number only triggers the read: what is applied is what the source says."""
        if self._loop_task is None or generation <= (self._generation() or 0):
            return
        reading = asyncio.ensure_future(self._read_after(time.monotonic()))
        try:
            await asyncio.wait({reading}, timeout=timeout)
        finally:
            reading.cancel()  # (the read itself is shielded: it goes on, and confirms)


class Fence:
    """A backend pod's fence: judges every request, on the event loop, against the view of the
    shard state its ``StateFollower`` holds, and counts the writes in flight. Build with
    ``from_configmap`` / ``from_file``."""

    def __init__(self, source: StateSource, group: str, *, pod: str | None = None) -> None:
        self.group = group
        self.pod = pod or socket.gethostname()
        self.follower = StateFollower(source, f"fence {group}")
        self.follower.subscribe(self._new_view)
        self._writes = InFlight(group)
        self._accepted = 0
        self._refused: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_configmap(
        cls,
        name: str,
        namespace: str | None = None,
        group: str | None = None,
        *,
        api_factory: Callable[[], client.ApiClient] | None = None,
        confirm_interval: float | None = None,
        watch_timing: WatchTiming | None = None,
        pod: str | None = None,
    ) -> Fence:
        """Fence on the state ConfigMap of the desired-config ConfigMap ``name``. Credentials
        as the gateway finds them (``load_api_client``) unless ``api_factory`` gives a client."""
        group = _group_or_env(group)
        if api_factory is None:
            from gateway.discovery.kubernetes import load_api_client

            directory = os.environ.get(env_name("service_account_dir")) or SERVICE_ACCOUNT_DIR

            def api_factory() -> client.ApiClient:
                return load_api_client(directory)

        source = ConfigMapSource(
            state_configmap_name(name),
            namespace or default_namespace(),
            api_factory,
            confirm_interval,
            watch_timing,
        )
        return cls(source, group, pod=pod)

    @classmethod
    def from_file(
        cls,
        path: str,
        group: str | None = None,
        *,
        state_path: str | None = None,
        poll_interval: float = FILE_POLL_INTERVAL,
        pod: str | None = None,
    ) -> Fence:
        """Fence on the state file of the desired-config file ``path`` (or ``state_path``)."""
        group = _group_or_env(group)
        return cls(FileSource(state_path or state_file_path(path), poll_interval), group, pod=pod)

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def source(self) -> StateSource:
        return self.follower.source

    @property
    def running(self) -> bool:
        return self.follower.running

    async def start(self) -> None:
        """Start reading the state (idempotent). Writes are refused until a read confirms one."""
        await asyncio.to_thread(default_routing)  # built once, off the request path
        await self.follower.start()

    async def stop(self) -> None:
        """Stop reading (idempotent); the view held stays, and its lease runs out."""
        await self.follower.stop()

    @property
    def view(self) -> View | None:
        return self.follower.view

    def confirmed(self, now: float | None = None) -> bool:
        return self.follower.confirmed(now)

    async def refresh(self, generation: int, timeout: float = REFRESH_WAIT) -> None:
        await self.follower.refresh(generation, timeout)

    def _new_view(self, view: View) -> None:
        if not any(self.group in t.groups for t in (view.current, view.incoming) if t is not None):
            log.warning(
                "fence %s: %s is in neither config of generation %d: every write will be refused",
                self.group,
                self.group,
                view.generation,
            )

    # -- requests -------------------------------------------------------------------------------

    def admit(self, method: bytes, headers: HeaderValues, request_id: str | None) -> Ticket | Answer | None:
        """Judge one request before the application sees it: None (a read: pass it on), a
        Ticket (an accepted write: release it when the application is done with it) or the
        Answer to send instead. Synchronous: no view switch can fall between the check and
        the registration of an accepted write."""
        view, now = self.follower.view, time.monotonic()
        verdict = decide(view, self.group, self.confirmed(now), method, headers)
        if verdict is None:
            return None
        if isinstance(verdict, Accept) and view is not None:
            self._accepted += 1
            return self._writes.add(verdict.key, now, view.lease)
        assert isinstance(verdict, Refuse)  # (decide accepts nothing without a view)
        self._refused[verdict.code] += 1
        body: dict[str, object] = {"error": verdict.code, "detail": verdict.detail}
        if verdict.owner is not None and view is not None:
            body |= {"owner": verdict.owner, "epoch": view.epoch, "generation": view.generation}
        body["request_id"] = request_id
        return Answer(verdict.status, verdict.code, _json_bytes(body), request_id, verdict.retry_after)

    async def state_answer(self, generation: str | None, request_id: str | None) -> Answer:
        """The state endpoint; ``generation`` above the one held reads the source first."""
        if generation is not None:
            try:
                wanted = int(generation)
            except ValueError:
                detail = "generation must be an integer"
                body: dict[str, object] = {"error": "bad_request", "detail": detail, "request_id": request_id}
                return Answer(400, "bad_request", _json_bytes(body), request_id)
            await self.refresh(wanted)
        return Answer(200, STATE_CODE, _json_bytes(self.describe()), request_id)

    def describe(self) -> dict[str, object]:
        view, at = self.follower.view, self.follower.confirmed_at
        now = time.monotonic()
        return {
            "fence": 1,
            "group": self.group,
            "pod": self.pod,
            "source": self.source.name,
            "generation": view.generation if view is not None else None,
            "phase": str(view.phase) if view is not None else None,
            "epoch": view.epoch if view is not None else None,
            "next_epoch": view.next_epoch if view is not None else None,
            "confirmed": self.confirmed(now),
            "confirmed_age": round(now - at, 3) if at is not None else None,
            "lease_seconds": view.lease if view is not None else None,
            "writes_in_flight": self._writes.count,
            "moving_writes_in_flight": self._writes.moving(view),
            "accepted": self._accepted,
            "refused": dict(self._refused),
        }

    # -- frameworks -----------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """aiohttp: the fence's middleware first (outermost), started and stopped with ``app``."""
        app.middlewares.insert(0, self._aiohttp_middleware())
        app.cleanup_ctx.append(self._aiohttp_lifetime)

    async def _aiohttp_lifetime(self, app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.stop()

    def _aiohttp_middleware(self) -> Middleware:
        @web.middleware
        async def fence_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            fields = request.headers

            def values(name: bytes) -> list[bytes]:
                # aiohttp decodes field values as UTF-8 with surrogateescape: this undoes it.
                return [v.encode("utf-8", "surrogateescape") for v in fields.getall(name.decode("ascii"), ())]

            request_id = request_id_of(values(b"x-request-id"))
            if request.method == "GET" and request.path == STATE_PATH:
                return _aiohttp_response(await self.state_answer(request.query.get("generation"), request_id))
            outcome = self.admit(request.method.encode("latin-1"), values, request_id)
            if isinstance(outcome, Answer):
                return _aiohttp_response(outcome)
            if outcome is None:
                return await handler(request)
            try:
                return await handler(request)
            finally:
                outcome.release()

        return fence_middleware

    def wrap(self, app: ASGIApp) -> FencedApp:
        """ASGI: ``app`` behind the fence, the fence started and stopped by the lifespan."""
        return FencedApp(self, app)


def _aiohttp_response(answer: Answer) -> web.Response:
    response = web.Response(status=answer.status, body=answer.body)
    for name, value in answer.header_pairs():
        response.headers[name] = value
    return response


# ---------------------------------------------------------------------------------------------
# ASGI

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class FencedApp:
    """An ASGI application behind a fence: ``http`` requests are judged first, ``lifespan``
    starts and stops the fence, anything else (websocket) is passed on unchanged."""

    def __init__(self, fence: Fence, app: ASGIApp) -> None:
        self.fence = fence
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await _Lifespan(self.fence, receive, send).run(self.app, scope)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields: list[tuple[bytes, bytes]] = list(scope.get("headers") or ())

        def values(name: bytes) -> list[bytes]:
            return [value for key, value in fields if key.lower() == name]

        request_id = request_id_of(values(b"x-request-id"))
        method: str = scope["method"]
        if method == "GET" and scope.get("path") == STATE_PATH:
            query = parse_qs(bytes(scope.get("query_string") or b"").decode("latin-1"))
            wanted = query.get("generation")
            await _asgi_send(send, await self.fence.state_answer(wanted[-1] if wanted else None, request_id))
            return
        outcome = self.fence.admit(method.encode("latin-1"), values, request_id)
        if isinstance(outcome, Answer):
            await _asgi_send(send, outcome)
        elif outcome is None:
            await self.app(scope, receive, send)
        else:
            try:
                await self.app(scope, receive, send)
            finally:
                outcome.release()


async def _asgi_send(send: Send, answer: Answer) -> None:
    headers = [(name.lower().encode("ascii"), value.encode("ascii")) for name, value in answer.header_pairs()]
    headers.append((b"content-length", str(len(answer.body)).encode("ascii")))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


class _Lifespan:
    """One lifespan run: the inner app's, with the fence started when the server announces
    the startup (so that its first read runs while the app starts up) and stopped once the app
    reports its shutdown. For an app that does not speak the protocol (it raises, or returns
    without answering the startup) the fence speaks it alone."""

    def __init__(self, fence: Fence, receive: Receive, send: Send) -> None:
        self._fence = fence
        self._receive = receive
        self._send = send
        self._startup_received = False
        self._start_error: str | None = None  # why the fence could not start, if it could not
        self._answered = False  # the app answered the startup (complete or failed)
        self._overruled = False  # the app's startup.complete was sent on as failed (the fence's)

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        try:
            await app(scope, self.receive, self.send)
        except Exception as exc:
            if self._answered:
                await self._fence.stop()
                raise
            log.info("the application does not support the ASGI lifespan (%r): the fence runs it", exc)
        if not self._answered:
            await self._alone()

    async def receive(self) -> Message:
        if self._overruled:
            # The server was told the startup failed and sends nothing more: let the app shut
            # down what it started.
            return {"type": "lifespan.shutdown"}
        message = await self._receive()
        if message.get("type") == "lifespan.startup" and not self._startup_received:
            self._startup_received = True
            await self._start_fence()
        return message

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind in ("lifespan.startup.complete", "lifespan.startup.failed"):
            self._answered = True
            if kind == "lifespan.startup.complete" and self._start_error is not None:
                self._overruled = True
                message = self._startup_failed()
        elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await self._fence.stop()
            if self._overruled:
                return  # the answer to our own shutdown, not the server's
        await self._send(message)

    async def _start_fence(self) -> None:
        try:
            await self._fence.start()
        except Exception as exc:  # reported as the startup's failure, once the app answers it
            log.exception("the fence could not start")
            self._start_error = f"shardgate fence: {exc}"

    def _startup_failed(self) -> Message:
        return {"type": "lifespan.startup.failed", "message": self._start_error or ""}

    async def _alone(self) -> None:
        if not self._startup_received:
            await self.receive()  # lifespan.startup: starts the fence
        if self._start_error is not None:
            await self._send(self._startup_failed())
            return
        await self._send({"type": "lifespan.startup.complete"})
        await self._receive()  # lifespan.shutdown
        await self._fence.stop()
        await self._send({"type": "lifespan.shutdown.complete"})
