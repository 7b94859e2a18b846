# Cython declarations for http.py (see flow.pxd). The two checks are cpdef so that
# request_head.pxd can cimport valid_request_id and call it as a C function; Python callers
# (client.py, tests) still import both by name.

cpdef bint valid_request_id(value) except -1
cpdef bint valid_host(bytes value) except -1

# A C global: looked up as a dict, without a method call (tests see it only in the pure build).
cdef dict _HOST_CACHE
