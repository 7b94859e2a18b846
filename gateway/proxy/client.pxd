# Cython declarations for client.py (see flow.pxd).

from gateway.proxy.context cimport ProxyContext
from gateway.proxy.exchange cimport Exchange
from gateway.proxy.flow cimport FlowControl

cdef class ClientConnection:
    cdef public ProxyContext ctx
    cdef public FlowControl flow
    cdef public Exchange parsing
    cdef public object parser, transport, _fresh_read
    cdef public bytes peer, _url
    cdef public list exchanges, _fields
    cdef public bint closed, _reading_head
    cdef public double deadline
    cdef public Py_ssize_t _head_bytes

    cpdef _note_read(self, data)
    cpdef _feed(self, data)
    cpdef _advance(self)
    cpdef update_reading(self)
    cpdef send(self, data)
    cpdef exchange_done(self, Exchange exchange, double now)
