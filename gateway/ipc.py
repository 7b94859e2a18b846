"""Messages between the ``--workers`` supervisor and its workers: one JSON object per line.

The supervisor writes to a worker's stdin, the worker answers on its stdout. Each direction is
a union of pydantic models told apart by ``op``, validated on receipt (``TO_WORKER`` /
``FROM_WORKER``); a line that is none of them raises ``pydantic.ValidationError``, which the
reader logs and skips.

Supervisor -> worker: ``start`` first (the worker's settings, its index and the topology, if
there is one yet: the worker binds the port only once it has read it), then ``topology`` on
every change, ``metrics`` at scrape time, ``drain`` and ``stop`` on shutdown.
Worker -> supervisor: ``ready`` once it listens, a ``metrics`` reply per ``metrics`` request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from gateway.config import ShardConfig
from gateway.settings import Settings
from gateway.topology import DiscoveredPod, Handoff, Topology, TopologyBuilder


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def encode(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


# -- supervisor -> worker ------------------------------------------------------------------------


class TopologyUpdate(_Message):
    """A whole topology: the config in force and the pods discovery found for its groups."""

    op: Literal["topology"] = "topology"
    config: ShardConfig
    pods: dict[str, list[DiscoveredPod]]
    generation: int | None = None  # of the shard state the config comes from
    incoming: ShardConfig | None = None  # while a hand-off is under way: the config handed to
    every_key_moves: bool = False
    unconfirmed: bool = False  # the supervisor's view of the shard state is past its lease

    @classmethod
    def of(cls, topology: Topology) -> TopologyUpdate:
        pods = {
            name: [DiscoveredPod(p.host, p.port, p.state, p.name) for p in group.pods]
            for name, group in topology.groups.items()
        }
        handoff = topology.handoff
        return cls(
            config=topology.config,
            pods=pods,
            generation=topology.generation,
            incoming=handoff.incoming.config if handoff is not None else None,
            every_key_moves=handoff.every_key_moves if handoff is not None else False,
            unconfirmed=topology.unconfirmed,
        )

    def handoff(self) -> Handoff | None:
        """The hand-off under way, rebuilt (its ring is built here: call it off the loop)."""
        if self.incoming is None or self.generation is None:
            return None
        return Handoff(self.generation, TopologyBuilder().build(self.incoming), self.every_key_moves)


class Start(_Message):
    op: Literal["start"] = "start"
    index: int = Field(ge=0)
    settings: Settings  # the supervisor's, with the data port it reserved
    topology: TopologyUpdate | None = None  # None until the first config is loaded


class MetricsRequest(_Message):
    op: Literal["metrics"] = "metrics"
    id: int


class Drain(_Message):
    """Readiness is the supervisor's; a draining worker answers with ``Connection: close``."""

    op: Literal["drain"] = "drain"


class Stop(_Message):
    op: Literal["stop"] = "stop"
    grace: float | None = Field(default=None, ge=0)  # None: the worker's settings.grace_timeout


ToWorker = Annotated[Start | TopologyUpdate | MetricsRequest | Drain | Stop, Field(discriminator="op")]
TO_WORKER: TypeAdapter[ToWorker] = TypeAdapter(ToWorker)


# -- worker -> supervisor ------------------------------------------------------------------------


class Ready(_Message):
    op: Literal["ready"] = "ready"
    pid: int


class MetricsReply(_Message):
    op: Literal["metrics"] = "metrics"
    id: int
    epoch: str | None  # of the snapshot the worker routes with
    data: dict[str, Any]  # Metrics.snapshot()
    pods: list[tuple[str, str, int, int, int]]  # group, address, in flight, connections, idle
    # "GROUP ADDRESS" -> "ejected" | "trial": the pods its passive health does not trust now
    health: dict[str, str] = Field(default_factory=dict)


class Applied(_Message):
    """The shard state's generation the worker routes on, and its writes in flight for keys
    moving under it (what the hand-off's barrier asks of the replica): at each new snapshot."""

    op: Literal["applied"] = "applied"
    generation: int | None
    moving_in_flight: int = Field(ge=0)


class ReadState(_Message):
    """A fenced pod refused one of the worker's writes: the supervisor should read the shard
    state now (a newer one exists)."""

    op: Literal["read_state"] = "read_state"


FromWorkerMessage = Ready | MetricsReply | Applied | ReadState
FromWorker = Annotated[FromWorkerMessage, Field(discriminator="op")]
FROM_WORKER: TypeAdapter[FromWorker] = TypeAdapter(FromWorker)
