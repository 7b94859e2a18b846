"""The gateway replicas of a fleet, as the hand-off's barrier counts them: one Lease per replica,
``NAME-replica-<identity>`` (label ``shardgate.io/replica-of: NAME``), whose annotations say
which generation of the shard state the replica routes on and how many of its writes in flight
are for keys moving under it. A replica renews its Lease every ``renew_interval`` and at once
when its report changes, and deletes it when it stops. The leader lists them all.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.coordination.kube import (
    LEASES,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Conflict,
    Objects,
    RawObject,
    check_name,
    micro_time,
    parse_time,
)
from gateway.handoff import Report
from gateway.tasks import cancel_and_wait, sleep_or_wake

if TYPE_CHECKING:
    from kubernetes import client

__all__ = ["GENERATION_ANNOTATION", "MOVING_ANNOTATION", "REPLICA_OF_LABEL", "ReplicaRegistry"]

log = logging.getLogger("shardgate.coordinator")

REPLICA_OF_LABEL = "shardgate.io/replica-of"
GENERATION_ANNOTATION = "shardgate.io/generation"
MOVING_ANNOTATION = "shardgate.io/moving-in-flight"
STALE_LEASES = 10  # a replica Lease not renewed for this many lease durations is a crashed replica's


class ReplicaRegistry:
    """This replica's Lease, and (for the leader) everyone's."""

    def __init__(
        self,
        api_factory: Callable[[], client.ApiClient],
        namespace: str,
        configmap: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_interval: float = 2.0,
        request_timeout: float = 5.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.configmap = configmap
        self.prefix = f"{configmap}-replica-"
        self.lease_name = check_name(self.prefix + identity)
        self.selector = f"{REPLICA_OF_LABEL}={configmap}"
        self.lease_seconds = max(1, math.ceil(lease_duration))  # an int32 in the Lease
        self.renew_interval = renew_interval
        self._objects = Objects(api_factory, LEASES, namespace, request_timeout)
        self._wall = wall
        self._generation: int | None = None
        self._moving = 0
        self._own: RawObject | None = None  # our Lease as last written
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.renewals = 0
        self.last_error: str | None = None

    # -- this replica ---------------------------------------------------------------------------

    def report(self, generation: int | None, moving_in_flight: int) -> None:
        """What this replica holds now; its Lease says so at once (on the event loop)."""
        if (generation, moving_in_flight) != (self._generation, self._moving):
            self._generation, self._moving = generation, moving_in_flight
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"replica-lease-{self.identity}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait(task)
        try:
            await asyncio.to_thread(self._objects.delete, self.lease_name)
        except Exception as exc:
            log.warning("replica lease %s: could not delete it (%s)", self.lease_name, exc)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await asyncio.to_thread(self._renew, self._generation, self._moving)
                self.renewals += 1
                if self.last_error is not None:
                    log.info("replica lease %s: renewed again", self.lease_name)
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if str(exc) != self.last_error:
                    log.warning("replica lease %s: could not renew it: %s", self.lease_name, exc)
                self.last_error = str(exc)
            await sleep_or_wake(self._wake, self.renew_interval)

    def _renew(self, generation: int | None, moving: int) -> None:
        now = self._wall()
        annotations = {MOVING_ANNOTATION: str(moving)}
        if generation is not None:
            annotations[GENERATION_ANNOTATION] = str(generation)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": micro_time(now),
        }
        metadata: RawObject = {
            "name": self.lease_name,
            "labels": {REPLICA_OF_LABEL: self.configmap, MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": annotations,
        }
        own = self._own
        if own is None:
            own = self._objects.get(self.lease_name)
        try:
            if own is None:
                spec["acquireTime"] = spec["renewTime"]
                self._own = self._objects.create({"kind": "Lease", "metadata": metadata, "spec": spec})
            else:
                old = own.get("spec") or {}
                spec["acquireTime"] = old.get("acquireTime") or spec["renewTime"]
                metadata["resourceVersion"] = (own.get("metadata") or {}).get("resourceVersion")
                self._own = self._objects.replace(
                    self.lease_name, {"kind": "Lease", "metadata": metadata, "spec": spec}
                )
        except Conflict:
            self._own = None  # read it again next time
            raise

    # -- the fleet (the leader's view) ----------------------------------------------------------

    async def replicas(self) -> dict[str, Report]:
        """Every registered replica and its report; a Lease not renewed for ten lease durations
        is a crashed replica's: skipped, and deleted (only if unchanged since it was listed)."""
        items = await asyncio.to_thread(self._objects.list, self.selector)
        now = self._wall()
        found: dict[str, Report] = {}
        for item in items:
            meta = item.get("metadata") or {}
            spec = item.get("spec") or {}
            name = str(meta.get("name") or "")
            renewed = parse_time(spec.get("renewTime"))
            duration = spec.get("leaseDurationSeconds") or self.lease_seconds
            if renewed is not None and now - renewed > STALE_LEASES * float(duration):
                await self._forget(name, meta.get("resourceVersion"), now - renewed)
                continue
            replica = spec.get("holderIdentity") or name.removeprefix(self.prefix)
            found[str(replica)] = report_of(meta.get("annotations") or {})
        return found

    async def _forget(self, name: str, version: object, age: float) -> None:
        try:
            gone = await asyncio.to_thread(
                self._objects.delete, name, version if isinstance(version, str) else None
            )
        except Conflict:
            return  # renewed meanwhile: alive after all
        except Exception as exc:
            log.warning("replica lease %s: could not delete it (%s)", name, exc)
            return
        if gone:
            log.info("replica lease %s: not renewed for %.0fs, deleted (a replica long gone)", name, age)

    def describe(self) -> dict[str, object]:
        return {
            "lease": self.lease_name,
            "generation": self._generation,
            "moving_in_flight": self._moving,
            "renewals": self.renewals,
            "last_error": self.last_error,
        }


def report_of(annotations: dict[str, str]) -> Report:
    """A replica's report from its Lease's annotations; one that cannot be read reports nothing
    (the barrier then waits for it as for a silent one)."""
    try:
        generation = int(annotations[GENERATION_ANNOTATION])
        moving = int(annotations.get(MOVING_ANNOTATION, "0"))
    except (KeyError, ValueError):
        return Report(None, 0)
    if moving < 0:
        return Report(None, 0)
    return Report(generation, moving)
