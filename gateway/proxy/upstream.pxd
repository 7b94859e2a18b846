# Cython declarations for upstream.py (see flow.pxd). ``exchange`` is typed by its interface
# (sides.ResponseSink): called through a C vtable, and this module never imports exchange.py.

from gateway.proxy.context cimport ProxyContext
from gateway.proxy.flow cimport FlowControl
from gateway.proxy.pool cimport PodLink
from gateway.proxy.response_head cimport client_head, framing
from gateway.proxy.sides cimport ResponseSink

cdef class UpstreamConnection:
    cdef public ProxyContext ctx
    cdef public PodLink link
    cdef public FlowControl flow
    cdef public ResponseSink exchange
    cdef public object transport, parser, _framing, _head_buffer, _raw
    cdef public double deadline, idle_since, sent_at
    cdef public bint closed, keep_alive, response_done, reused, _informational
    cdef public int fd, _status
    cdef public Py_ssize_t _head_at, _head_end

    cpdef _read(self, ResponseSink exchange, data)
    cpdef _parse(self, ResponseSink exchange, data)
    cpdef start(self, ResponseSink exchange, body, double now)
    cpdef send(self, data)
    cpdef client_writable(self, bint writable)
    cpdef _emit_head(self, ResponseSink exchange, head, body)
    cpdef _complete(self, ResponseSink exchange)
    cpdef idle_at(self, double now, double deadline)
    cpdef bint usable(self) except -1
    cpdef close(self)
    cpdef abort(self)
