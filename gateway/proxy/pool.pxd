# Cython declarations for pool.py (see flow.pxd).

cdef class PodLink:
    cdef public object pod, _metrics, _header_latency
    cdef public bytes group_bytes, group_line
    cdef public list idle
    cdef public Py_ssize_t connections
