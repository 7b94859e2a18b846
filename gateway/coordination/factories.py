"""Assembling a coordinator: for a gateway on a ConfigMap (the state ConfigMap, the leader
Lease, a replica Lease of its own) or on a file (the state file, always the leader)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.coordination.coordinator import Coordinator
from gateway.coordination.election import Election, LeaderElection, SoleLeader
from gateway.coordination.prober import PodProber
from gateway.coordination.registry import ReplicaRegistry
from gateway.coordination.store import ConfigMapStateStore, FileStateStore, StateStore
from gateway.shardstate import state_file_path

if TYPE_CHECKING:
    from kubernetes import client

__all__ = ["Timing", "file_coordinator", "kubernetes_coordinator"]


@dataclass(frozen=True)
class Timing:
    """Every period of the coordination (seconds); the factories take these as keywords."""

    interval: float = 0.25  # rounds while fencing
    stable_interval: float = 1.0  # rounds while stable (and at once on desired_changed)
    backoff_max: float = 5.0  # rounds after failed rounds back off up to this
    lease_duration: float = 15.0  # the leader Lease (and the replica Leases' duration)
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    replica_renew: float = 2.0  # a replica Lease's renewals
    probe_timeout: float = 1.0  # one fence request
    request_timeout: float = 5.0  # one API-server request


def _coordinator(
    identity: str,
    store: StateStore,
    election: Election,
    registry: ReplicaRegistry | None,
    times: Timing,
    desired: Callable[[], str | None],
    pods_of: Callable[[str], Iterable[str]],
    on_handoff: Callable[[str, float], None] | None,
) -> Coordinator:
    """A coordinator on ``store``, ``election`` and ``registry``; the rest is the same for all."""
    return Coordinator(
        identity=identity,
        store=store,
        election=election,
        registry=registry,
        prober=PodProber(times.probe_timeout),
        desired=desired,
        pods_of=pods_of,
        interval=times.interval,
        stable_interval=times.stable_interval,
        backoff_max=times.backoff_max,
        on_handoff=on_handoff,
    )


def kubernetes_coordinator(
    api_factory: Callable[[], client.ApiClient],
    namespace: str,
    configmap: str,
    identity: str,
    desired: Callable[[], str | None],
    pods_of: Callable[[str], Iterable[str]],
    on_handoff: Callable[[str, float], None] | None = None,
    **timing: float,
) -> Coordinator:
    """The coordinator of a gateway on the ConfigMap ``configmap``: the state ConfigMap, the
    Lease ``configmap-leader``, and a replica Lease of its own. ``timing``: ``Timing``'s fields."""
    times = Timing(**timing)
    return _coordinator(
        identity,
        ConfigMapStateStore(api_factory, namespace, configmap, timeout=times.request_timeout),
        LeaderElection(
            api_factory,
            namespace,
            configmap,
            identity,
            lease_duration=times.lease_duration,
            renew_deadline=times.renew_deadline,
            retry_period=times.retry_period,
            request_timeout=times.request_timeout,
        ),
        ReplicaRegistry(
            api_factory,
            namespace,
            configmap,
            identity,
            lease_duration=times.lease_duration,
            renew_interval=times.replica_renew,
            request_timeout=times.request_timeout,
        ),
        times,
        desired,
        pods_of,
        on_handoff,
    )


def file_coordinator(
    config_path: str,
    identity: str,
    desired: Callable[[], str | None],
    pods_of: Callable[[str], Iterable[str]],
    state_path: str | None = None,
    on_handoff: Callable[[str, float], None] | None = None,
    **timing: float,
) -> Coordinator:
    """The coordinator of a gateway on the file ``config_path``: the state file beside it (or
    ``state_path``), always the leader, no registry (one process)."""
    times = Timing(**timing)
    store = FileStateStore(state_path or state_file_path(config_path))
    return _coordinator(identity, store, SoleLeader(identity), None, times, desired, pods_of, on_handoff)
