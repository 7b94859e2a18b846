# Cython declarations for exchange.py (see flow.pxd).
#
# ``client`` (the ClientSide interface) and ``upstream`` stay untyped objects: typing them would
# cimport client.pxd / upstream.pxd, and a cimport is an import when the module initialises,
# while client.py imports this module (a cycle). Types may only be shared along the direction
# the modules import one another.

cdef class Exchange:
    cdef public object client, upstream, decision, refusal, error, pod, served_by, span
    cdef public object traceparent, dechunker
    cdef public double start_time
    cdef public int state, status, attempts
    cdef public bytes head, rid, method, target
    cdef public list pending
    cdef public Py_ssize_t pending_bytes, body_bytes
    cdef public bint chunked, request_done, keep_alive, http10, is_head, is_write, expect_continue

    cpdef head_complete(self, method)
    cpdef add_body(self, data)
    cpdef body_complete(self)
    cpdef flush_body(self)
    cpdef list take_pending(self)
    cpdef bind(self, pod)
    cpdef release(self)
    cpdef start(self)
    cpdef dispatch(self, exclude)
    cpdef send_on(self, conn, double now)
