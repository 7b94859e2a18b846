"""The two small interfaces between the data plane's three parts, as base classes.

``ClientSide`` is what an exchange needs of its client connection (``ClientConnection``
implements it); ``ResponseSink`` is what an upstream connection needs of the exchange it
carries (``Exchange`` implements it). Neither side imports the other: each knows only the
interface here. They are base classes rather than ``typing.Protocol``s so that the compiled
build can call their methods directly (a C vtable call; see sides.pxd), with no module import
cycle between client, exchange and upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.proxy.context import ProxyContext
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.response_head import Framing
    from gateway.router import Refusal


class ClientSide:
    """What an exchange needs of the client connection it belongs to."""

    __slots__ = ()
    ctx: ProxyContext
    closed: bool

    def send(self, data: bytes | memoryview) -> None:
        """Write response bytes to the client."""
        raise NotImplementedError

    def exchange_done(self, exchange: Exchange, now: float) -> None:
        """The exchange's response is complete."""
        raise NotImplementedError

    def abort(self, exchange: Exchange) -> None:
        """A response under way cannot be completed: cut the client off."""
        raise NotImplementedError

    def refuse(self, exchange: Exchange, refusal: Refusal) -> None:
        """Answer the exchange with the contract's error instead of an upstream's response."""
        raise NotImplementedError

    def upstream_full(self, full: bool) -> None:
        """The upstream connection cannot (or can again) take more of the request body."""
        raise NotImplementedError

    def update_reading(self) -> None:
        """Reading may have to pause or resume (an exchange's state changed)."""
        raise NotImplementedError

    def resume(self, exchange: Exchange) -> None:
        """The exchange waited for an answer from outside the connection, and may go on."""
        raise NotImplementedError

    def writable(self) -> bool:
        """Whether the client's connection takes more bytes now (its write buffer is not full)."""
        raise NotImplementedError


class ResponseSink:
    """What an upstream connection needs of the exchange it carries."""

    __slots__ = ()
    head: bytes
    is_head: bool
    http10: bool
    request_done: bool

    def response_head(self, kept: bytes, status: int, framing: Framing, body: Any, group: bytes) -> None:
        """The response head, hop-by-hop fields out (and the body bytes that came with it)."""
        raise NotImplementedError

    def response_body(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def response_complete(self, now: float) -> None:
        raise NotImplementedError

    def upstream_lost(self, reused_connection: bool, until_close: bool) -> None:
        """The connection closed under the exchange."""
        raise NotImplementedError

    def upstream_invalid(self) -> None:
        raise NotImplementedError

    def upstream_timeout(self) -> None:
        raise NotImplementedError

    def internal_error(self) -> None:
        """A bug of ours while handling the response (logged where it was caught)."""
        raise NotImplementedError

    def upstream_full(self, full: bool) -> None:
        """The upstream connection's write buffer filled (or drained)."""
        raise NotImplementedError

    def client_writable(self) -> bool:
        """Whether the client can take more of the response now."""
        raise NotImplementedError
