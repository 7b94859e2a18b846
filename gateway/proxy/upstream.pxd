# Cython declarations for upstream.py (see flow.pxd).
#
# ``exchange`` is the ResponseSink interface, so it stays an untyped object (an Exchange in the
# gateway; typing it as one would refuse any other sink in the compiled build only).

from gateway.proxy.context cimport ProxyContext
from gateway.proxy.flow cimport FlowControl
from gateway.proxy.pool cimport PodLink

cdef class UpstreamConnection:
    cdef public ProxyContext ctx
    cdef public PodLink link
    cdef public FlowControl flow
    cdef public object transport, parser, exchange, _framing, _head_buffer, _raw
    cdef public double deadline, idle_since, sent_at
    cdef public bint closed, keep_alive, response_done, reused, _informational
    cdef public int fd, _status
    cdef public Py_ssize_t _head_at, _head_end

    cpdef _read(self, exchange, data)
    cpdef _parse(self, exchange, data)
    cpdef start(self, exchange, body, double now)
    cpdef send(self, data)
    cpdef client_writable(self, bint writable)
    cpdef _emit_head(self, exchange, head, body)
    cpdef _complete(self, exchange)
    cpdef idle_at(self, double now, double deadline)
    cpdef bint usable(self) except -1
    cpdef close(self)
    cpdef abort(self)
