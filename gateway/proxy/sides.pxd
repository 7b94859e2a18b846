# Cython declarations for sides.py (see flow.pxd): the interfaces as extension types, so that a
# typed ``client`` or ``exchange`` attribute is called through a C vtable.

from gateway.proxy.context cimport ProxyContext

cdef class ClientSide:
    cdef public ProxyContext ctx
    cdef public bint closed

    cpdef send(self, data)
    cpdef exchange_done(self, exchange, double now)
    cpdef abort(self, exchange)
    cpdef refuse(self, exchange, refusal)
    cpdef upstream_full(self, bint full)
    cpdef update_reading(self)
    cpdef resume(self, exchange)
    cpdef bint writable(self) except -1

cdef class ResponseSink:
    cdef public bytes head
    cdef public bint is_head, http10, request_done

    cpdef response_head(self, bytes kept, int status, framing, body, bytes group)
    cpdef response_body(self, data)
    cpdef response_complete(self, double now)
    cpdef upstream_lost(self, bint reused_connection, bint until_close)
    cpdef upstream_invalid(self)
    cpdef upstream_timeout(self)
    cpdef internal_error(self)
    cpdef upstream_full(self, bint full)
    cpdef bint client_writable(self) except -1
