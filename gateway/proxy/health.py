"""Passive health: outlier ejection from what requests meet (docs/contract.md "Health").

A pod that refuses a connection, resets one under a request, or does not answer in time is
**ejected**: it gets no new request for ``base_ejection`` seconds times its ejections so far
(up to ``max_ejection``, plus up to 10% jitter so that replicas do not bring it back in step).
A run of ``consecutive_5xx`` 5xx answers ejects it too, but never the last usable pod of its
group: a database outage that makes every pod answer 500 is the application's answer, and the
client should see it, not a 503 of ours. When an ejection ends the pod gets one **trial**
request: an answer below 500 trusts it again, a failure ejects it for longer.

Ejection only ever chooses among a group's own pods (``router.choose_pod`` skips ejected ones):
a write whose owner group has no usable pod left is answered ``503 shard_unavailable`` at once,
never sent elsewhere. A fenced pod's 421, a 429 and the gateway's own answers are no failure.

The state is per data-plane process (each ``--workers`` worker ejects on what it meets). It
lives on ``Pod.ejected``/``Pod.trial`` (read by ``choose_pod`` on every request: a bool each)
and in a ``PodHealth`` record kept here, which survives topology rebuilds as the Pod does.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from gateway.config import PassiveHealthConfig
from gateway.observability.metrics import Metrics
from gateway.topology import Pod, PodState, Topology, TopologyHolder, health_of

log = logging.getLogger("shardgate.health")

JITTER = 0.1  # an ejection lasts up to this share longer, at random
# The reasons a pod is ejected (the label of shardgate_pod_ejections_total).
CONNECT_FAILURE = "connect_failure"
CONNECT_TIMEOUT = "connect_timeout"
RESET = "reset"
TIMEOUT = "timeout"
CONSECUTIVE_5XX = "consecutive_5xx"
DEFAULT_SETTINGS = PassiveHealthConfig()


class PodHealth:
    """What the passive checks know of one pod."""

    __slots__ = ("consecutive_5xx", "ejected_until", "ejections", "last_reason", "timer", "trusted_at")

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.ejections = 0  # in a row: forgotten once the pod has been trusted for max_ejection
        self.ejected_until = 0.0  # loop time
        self.last_reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.trusted_at = 0.0  # loop time its last trial succeeded


class Outliers:
    """The passive health of every pod this process sends requests to."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        holder: TopologyHolder,
        metrics: Metrics,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._loop = loop
        self._holder = holder
        self._metrics = metrics
        self._jitter = jitter
        self._pods: dict[Pod, PodHealth] = {}
        self._settings_of: dict[str, PassiveHealthConfig] = {}  # group -> its settings
        if holder.current is not None:
            self.on_topology(holder.current)

    # -- what requests meet ---------------------------------------------------------------------

    def failed(self, pod: Pod, reason: str, trial: bool) -> None:
        """No answer from ``pod`` (refused, reset, timed out): it is ejected. ``trial``: the
        request was the pod's trial. A pod already ejected is not ejected again by the requests
        that were on their way to it (one incident is one ejection)."""
        if self._settings(pod).enabled and not self._already_ejected(pod, trial):
            self._eject(pod, self._record(pod), reason)

    def answered(self, pod: Pod, server_error: bool, trial: bool) -> None:
        """``pod`` answered: a 5xx (``server_error``) counts towards a run, anything else ends
        one (a 4xx, a fence's 421 or 503, a 429: the pod works). ``trial``: the request was
        the pod's trial, whose answer decides."""
        record = self._pods.get(pod)  # (None for a pod that never failed: most of them)
        on_trial = trial and pod.trial
        if not server_error:
            if record is not None and record.consecutive_5xx:
                record.consecutive_5xx = 0
            if on_trial:
                self._trust(pod, record or self._record(pod))
            return
        settings = self._settings(pod)
        if not settings.enabled or self._already_ejected(pod, trial):
            return
        record = record or self._record(pod)
        if record.consecutive_5xx < settings.consecutive_5xx:  # (bounded: a run only matters so far)
            record.consecutive_5xx += 1
        if not on_trial and record.consecutive_5xx < settings.consecutive_5xx:
            return
        if self._others_usable(pod):
            self._eject(pod, record, CONSECUTIVE_5XX)  # (a failed trial: ejected for longer)
        elif on_trial:
            self._trust(pod, record)  # the group's last usable pod: its 500s are the application's

    def trial_started(self, pod: Pod) -> None:
        """A request was bound to a pod on trial: nobody else goes there until it is answered."""
        pod.ejected = True

    def trial_abandoned(self, pod: Pod) -> None:
        """The trial request went away unanswered (its client left): the next one is the trial."""
        if pod.trial:
            pod.ejected = False

    @staticmethod
    def _already_ejected(pod: Pod, trial: bool) -> bool:
        """Ejected, and this is not the outcome of its trial (a request sent before)."""
        return pod.ejected and not (trial and pod.trial)

    # -- ejection -------------------------------------------------------------------------------

    def _eject(self, pod: Pod, record: PodHealth, reason: str) -> None:
        settings = self._settings(pod)
        now = self._loop.time()
        if not pod.trial and record.trusted_at and now - record.trusted_at > settings.max_ejection:
            record.ejections = 0  # trusted long enough: this incident starts from the base time
        record.trusted_at = 0.0
        record.ejections += 1
        duration = min(settings.base_ejection * record.ejections, settings.max_ejection)
        duration *= 1 + JITTER * self._jitter()
        record.ejected_until = now + duration
        record.consecutive_5xx = 0
        record.last_reason = reason
        if record.timer is not None:
            record.timer.cancel()
        record.timer = self._loop.call_later(duration, self._end_ejection, pod)
        pod.ejected, pod.trial = True, False
        self._metrics.ejected(pod.group, reason)
        log.warning(
            "pod %s of group %s ejected for %.1fs (%s; ejection %d)",
            pod.address,
            pod.group,
            duration,
            reason,
            record.ejections,
        )

    def _end_ejection(self, pod: Pod) -> None:
        record = self._record(pod)
        record.timer = None
        pod.ejected, pod.trial = False, True
        log.info("pod %s of group %s: ejection over, next request is a trial", pod.address, pod.group)

    def _trust(self, pod: Pod, record: PodHealth) -> None:
        pod.ejected, pod.trial = False, False
        record.trusted_at = self._loop.time()
        log.info("pod %s of group %s: its trial request was answered, trusted again", pod.address, pod.group)

    def _release(self, pod: Pod, record: PodHealth) -> None:
        """Passive health is off for its group: whatever it held against the pod is dropped."""
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        pod.ejected, pod.trial = False, False
        record.consecutive_5xx = 0

    # -- what is known ------------------------------------------------------------------------

    def on_topology(self, topology: Topology) -> None:
        """A new snapshot: each group's settings; the records of pods gone from it dropped (their
        timers cancelled); pods of groups whose passive health is now off trusted again."""
        config = topology.config
        self._settings_of = {g.name: config.passive_health(g) for g in config.groups}
        for pod, record in list(self._pods.items()):
            if pod.state is PodState.REMOVED:
                self._release(pod, record)
                del self._pods[pod]
            elif not self._settings(pod).enabled:
                self._release(pod, record)

    def _record(self, pod: Pod) -> PodHealth:
        record = self._pods.get(pod)
        if record is None:
            record = self._pods[pod] = PodHealth()
        return record

    def _settings(self, pod: Pod) -> PassiveHealthConfig:
        return self._settings_of.get(pod.group, DEFAULT_SETTINGS)

    def _others_usable(self, pod: Pod) -> bool:
        """Whether another pod of ``pod``'s group is trusted to take requests now: ready, not
        ejected, not on trial (a trial may yet fail)."""
        topology = self._holder.current
        view = topology.groups.get(pod.group) if topology is not None else None
        pods = view.pods if view is not None else ()
        return any(p is not pod and p.state is PodState.READY and not p.ejected and not p.trial for p in pods)

    def describe(self, pod: Pod) -> dict[str, object]:
        """/debug/ring's view of a pod's passive health (the same fields for every pod)."""
        record = self._pods.get(pod) or PodHealth()
        ejected = pod.ejected and not pod.trial
        left = max(0.0, record.ejected_until - self._loop.time()) if ejected else 0.0
        return {
            "health": health_of(pod),
            "ejections": record.ejections,
            "ejected_for": round(left, 3),
            "last_ejection_reason": record.last_reason,
            "consecutive_5xx": record.consecutive_5xx,
        }
