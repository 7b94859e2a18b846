"""Flow control: why a connection stopped reading, as one small object per connection.

Reading pauses for as long as any reason holds (bit flags) and resumes when the last one goes,
so that independent parts of the data plane (pipelining, a full upstream buffer, a slow
client) can each hold a connection back without knowing of one another. Writing is paused by
the transport itself (``pause_writing``/``resume_writing``); ``write_paused`` mirrors it. The
model is uvicorn's ``FlowControl`` (protocols/http/flow_control.py).
"""

from __future__ import annotations

import asyncio

# Reasons to stop reading from a client.
PIPELINE = 1  # an earlier request is still being answered
UPSTREAM_FULL = 2  # the upstream connection's write buffer is full
PENDING = 4  # too much body buffered while the upstream connection is being set up
BROKEN = 8  # nothing more is read on this connection
# ... and from an upstream.
CLIENT_SLOW = 16  # the client's write buffer is full


class FlowControl:
    __slots__ = ("read_blocks", "stopped", "transport", "write_paused")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.transport = transport
        self.read_blocks = 0
        self.write_paused = False
        self.stopped = False  # the connection is closed: the transport must not be touched

    def block_reading(self, reason: int) -> bool:
        """Hold reading back for ``reason``; whether reading was paused by this call."""
        paused = not self.read_blocks and not self.stopped
        if paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.read_blocks |= reason
        return paused

    def unblock_reading(self, reason: int) -> bool:
        """``reason`` no longer holds; whether reading resumed by this call."""
        if not self.read_blocks & reason:
            return False
        self.read_blocks &= ~reason
        resumed = not self.read_blocks and not self.stopped
        if resumed:
            self.transport.resume_reading()  # type: ignore[union-attr]
        return resumed

    def set_block(self, reason: int, blocked: bool) -> None:
        """Hold reading back for ``reason``, or not (usually already so: nothing to do)."""
        if blocked != bool(self.read_blocks & reason):
            if blocked:
                self.block_reading(reason)
            else:
                self.unblock_reading(reason)
