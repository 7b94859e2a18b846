"""Coordination of ownership hand-offs: the I/O around the pure decisions of ``gateway.handoff``
(docs/design/014-ownership-handoff.md).

* ``store``: where the shard state lives (the state ConfigMap or the state file), read
  directly and written with compare-and-swap;
* ``election``: which replica drives hand-offs (a Lease with client-go's semantics, or the one
  process of a file source);
* ``registry``: the gateway replicas the barrier waits for (one Lease each);
* ``prober``: asking backend pods' fences what they hold;
* ``coordinator``: the leader's loop;
* ``factories``: ``kubernetes_coordinator`` and ``file_coordinator``, which assemble one.

Nothing here imports the Kubernetes client at run time: a gateway on a file source never loads it.
"""

from gateway.coordination.coordinator import Coordinator
from gateway.coordination.election import Election, LeaderElection, SoleLeader
from gateway.coordination.factories import Timing, file_coordinator, kubernetes_coordinator
from gateway.coordination.kube import ApiError, Conflict
from gateway.coordination.prober import UNFENCED, PodProber
from gateway.coordination.registry import ReplicaRegistry
from gateway.coordination.store import ConfigMapStateStore, FileStateStore, StateStore

__all__ = [
    "UNFENCED",
    "ApiError",
    "ConfigMapStateStore",
    "Conflict",
    "Coordinator",
    "Election",
    "FileStateStore",
    "LeaderElection",
    "PodProber",
    "ReplicaRegistry",
    "SoleLeader",
    "StateStore",
    "Timing",
    "file_coordinator",
    "kubernetes_coordinator",
]
