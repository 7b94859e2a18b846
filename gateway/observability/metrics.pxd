# Cython declarations for metrics.py (see gateway/proxy/flow.pxd). Only the two counters that
# every request updates are extension types (typed fields, C-level observe); the collector and
# the rest of the module compile as ordinary Python classes.

cdef class Histogram:
    cdef public tuple bounds
    cdef public list buckets
    cdef public double total

    cpdef observe(self, double value)

cdef class RouteStats:
    cdef public list codes
    cdef public Histogram duration

    cpdef observe(self, int status, double seconds)
