"""Which replica drives hand-offs: a coordination.k8s.io/v1 Lease ``NAME-leader``, with
client-go's leader-election semantics, or, with a file source, the one process (``SoleLeader``).

Leadership here is for liveness only: two replicas that both believe they lead (a paused
leader that wakes up) still write one linear history, because every state write is a
compare-and-swap (``gateway.coordination.store``).

client-go's rules, as ``k8s.io/client-go/tools/leaderelection`` applies them:

* A candidate takes the Lease when it is absent, released (no holder), or expired. Expiry is
  judged by *observed* time, never by the timestamps in the record (the clocks of two machines
  are not compared): the record must have stayed unchanged for ``leaseDurationSeconds`` on the
  candidate's own monotonic clock.
* The leader renews every ``retry_period``; if no renewal succeeded within ``renew_deadline`` of
  the last successful one (measured from when that one was sent) it stops leading. The renew
  deadline is below the lease duration, so the old leader has stopped before anyone can take over.
* Every update is a compare-and-swap on the Lease's resourceVersion; a taken-over Lease counts
  ``leaseTransitions`` up; ``acquireTime``/``renewTime`` are MicroTimes.
* On stop the leader releases the Lease (no holder), so the next one need not wait it out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from gateway.coordination.kube import (
    LEASES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Conflict,
    Objects,
    RawObject,
    check_name,
    micro_time,
)
from gateway.tasks import cancel_and_wait, sleep_or_wake

if TYPE_CHECKING:
    from kubernetes import client

__all__ = ["Election", "LeaderElection", "SoleLeader"]

log = logging.getLogger("shardgate.coordinator")

JITTER = 1.2  # client-go's JitterFactor for a candidate's retries


class Election(Protocol):
    identity: str

    @property
    def leading(self) -> bool: ...

    async def start(self, changed: Callable[[], None]) -> None:
        """Begin; ``changed`` is called (on the event loop) when leadership is won or lost."""

    async def stop(self) -> None:
        """Stop, and give up leadership if held."""

    def describe(self) -> dict[str, object]: ...


class SoleLeader:
    """The file source's election: one process, always the leader."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    @property
    def leading(self) -> bool:
        return True

    async def start(self, changed: Callable[[], None]) -> None:
        changed()

    async def stop(self) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"kind": "sole", "identity": self.identity, "leading": True}


class LeaderElection:
    """The Lease ``NAME-leader``: one candidate per replica (``identity``, unique)."""

    def __init__(
        self,
        api_factory: Callable[[], client.ApiClient],
        namespace: str,
        configmap: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        request_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry_period < renew_deadline < lease_duration")
        self.identity = identity
        self.lease_name = check_name(f"{configmap}-leader")
        self.name = f"lease {namespace}/{self.lease_name}"
        self.lease_seconds = max(1, math.ceil(lease_duration))  # an int32 in the Lease
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._request_timeout = request_timeout
        self._objects = Objects(api_factory, LEASES, namespace, request_timeout)
        self._clock = clock
        self._wall = wall
        self._changed: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._leader = False
        self._renewed_at: float | None = None  # send time of the last successful acquire/renew
        self._observed: RawObject | None = None  # the Lease as last read or written
        self._observed_spec: dict[str, Any] | None = None
        self._observed_at = 0.0  # when the record last changed, on our clock
        self.acquired_at: float | None = None  # when leadership was last won (our clock)
        self.lost_at: float | None = None  # when it was last lost
        self.transitions = 0  # times this candidate won the Lease
        self._last_error: str | None = None

    # -- state ----------------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """True only while the last successful renewal was sent less than ``renew_deadline``
        ago: a leader whose renewals hang stops leading on time, whatever its loop is doing."""
        at = self._renewed_at
        return self._leader and at is not None and self._clock() < at + self.renew_deadline

    @property
    def renewed_at(self) -> float | None:
        return self._renewed_at

    def describe(self) -> dict[str, object]:
        spec = self._observed_spec or {}
        return {
            "kind": "lease",
            "lease": self.name,
            "identity": self.identity,
            "leading": self.leading,
            "holder": spec.get("holderIdentity") or None,
            "lease_transitions": spec.get("leaseTransitions"),
            "renewed_ago": round(self._clock() - self._renewed_at, 3)
            if self._renewed_at is not None
            else None,
            "last_error": self._last_error,
        }

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, changed: Callable[[], None]) -> None:
        if self._task is not None:
            return
        self._changed = changed
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"leader-election-{self.identity}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        was_leader = self._leader
        self._set_leader(False)
        if was_leader:
            try:
                released = await asyncio.to_thread(self._release)
            except Exception as exc:
                log.warning("%s: could not release the lease (%s); it runs out by itself", self.name, exc)
            else:
                if released:
                    log.info("%s: released by %s", self.name, self.identity)

    # -- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                won = await self._attempt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, refused, malformed: a failed attempt
                won = False
                if str(exc) != self._last_error:
                    log.warning("%s: %s could not reach the lease: %s", self.name, self.identity, exc)
                self._last_error = str(exc)
            if won:
                self._last_error = None
            if self._leader and not self.leading:
                log.warning(
                    "%s: %s stops leading: no renewal succeeded within %.1fs",
                    self.name,
                    self.identity,
                    self.renew_deadline,
                )
                self._set_leader(False)
            delay = self.retry_period if self._leader else self.retry_period * random.uniform(1.0, JITTER)
            await sleep_or_wake(self._wake, delay)
            self._wake.clear()

    async def _attempt(self) -> bool:
        sent = self._clock()
        timeout = self._request_timeout
        if self._leader and self._renewed_at is not None:
            # A renewal that answers after the deadline is worthless: do not wait longer.
            timeout = max(0.05, min(timeout, self._renewed_at + self.renew_deadline - sent))
        async with asyncio.timeout(timeout * 2 + 1):  # (the thread itself ends by its timeouts)
            outcome = await asyncio.to_thread(self._try_acquire_or_renew, timeout)
        if outcome == "held":
            self._renewed_at = sent
            if not self._leader:
                self.transitions += 1
                self._set_leader(True)
                log.info("%s: %s leads (acquired)", self.name, self.identity)
            return True
        if outcome == "other" and self._leader:
            log.warning("%s: %s stops leading: the lease is held by another", self.name, self.identity)
            self._set_leader(False)
        return False

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        now = self._clock()
        if leader:
            self.acquired_at = now
        else:
            self.lost_at = now
        self._changed()

    def _try_acquire_or_renew(self, timeout: float) -> str:
        """client-go's tryAcquireOrRenew: "held" if this candidate holds the Lease now,
        "other" if another holds it (not expired), "failed" if a write lost a race."""
        now = self._wall()
        obj = self._objects.get(self.lease_name, timeout=timeout)
        if obj is None:
            spec = self._spec(now, acquired=now, transitions=0)
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.lease_name, "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
                "spec": spec,
            }
            try:
                created = self._objects.create(body, timeout=timeout)
            except Conflict:
                return "failed"
            self._observe(created)
            return "held"
        spec = dict(obj.get("spec") or {})
        self._observe(obj)
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        if holder and holder != self.identity and self._observed_at + float(duration) > self._clock():
            return "other"
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0)
        new_spec = self._spec(
            now,
            acquired=spec.get("acquireTime") if mine else now,
            transitions=transitions if mine else transitions + 1,
        )
        try:
            replaced = self._objects.replace(self.lease_name, self._body(obj, new_spec), timeout=timeout)
        except Conflict:
            return "failed"
        self._observe(replaced)
        return "held"

    def _spec(self, now: float, *, acquired: float | str | None, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "acquireTime": acquired if isinstance(acquired, str) else micro_time(acquired or now),
            "renewTime": micro_time(now),
            "leaseTransitions": transitions,
        }

    @staticmethod
    def _body(obj: RawObject, spec: dict[str, Any]) -> RawObject:
        meta = dict(obj.get("metadata") or {})
        metadata = {
            k: meta[k]
            for k in ("name", "namespace", "resourceVersion", "uid", "labels", "annotations")
            if meta.get(k)
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    def _observe(self, obj: RawObject) -> None:
        spec = dict(obj.get("spec") or {})
        if spec != self._observed_spec:
            self._observed_spec = spec
            self._observed_at = self._clock()
        self._observed = obj

    def _release(self) -> bool:
        """Give the Lease up (no holder, as client-go's ReleaseOnCancel) if it is still ours."""
        obj = self._objects.get(self.lease_name)
        if obj is None or (obj.get("spec") or {}).get("holderIdentity") != self.identity:
            return False
        now = self._wall()
        spec = {
            "leaseDurationSeconds": 1,
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
            "leaseTransitions": int((obj.get("spec") or {}).get("leaseTransitions") or 0),
        }
        try:
            self._objects.replace(self.lease_name, self._body(obj, spec))
        except Conflict:
            return False
        return True
