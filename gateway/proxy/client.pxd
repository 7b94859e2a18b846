# Cython declarations for client.py (see flow.pxd).

from gateway.proxy.exchange cimport Exchange
from gateway.proxy.flow cimport FlowControl
from gateway.proxy.sides cimport ClientSide

cdef class ClientConnection(ClientSide):
    cdef public FlowControl flow
    cdef public Exchange parsing
    cdef public object parser, transport, _fresh_read
    cdef public bytes peer, _url
    cdef public list exchanges, _fields
    cdef public bint _reading_head
    cdef public double deadline
    cdef public Py_ssize_t _head_bytes

    cpdef _note_read(self, data)
    cpdef _feed(self, data)
    cpdef _advance(self)
    cpdef bint _buffering(self) except -1
    # ClientSide
    cpdef send(self, data)
    cpdef exchange_done(self, exchange, double now)
    cpdef abort(self, exchange)
    cpdef refuse(self, exchange, refusal)
    cpdef upstream_full(self, bint full)
    cpdef update_reading(self)
    cpdef bint writable(self) except -1
