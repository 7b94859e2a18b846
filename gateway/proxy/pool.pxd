# Cython declarations for pool.py (see flow.pxd).

cdef class PodLink:
    cdef public object pod, _metrics, _header_latency
    cdef public bytes group_bytes, group_line
    cdef public list idle
    cdef public Py_ssize_t connections

    # Per request (upstream.pxd and exchange.pxd cimport PodLink): C calls. ``conn`` and ``ctx``
    # stay objects: upstream and context import this module, so it cannot cimport them.
    cpdef observe_header_latency(self, double seconds)
    cpdef acquire(self, double now)
    cpdef release(self, conn, double now, ctx)
