# Cython declarations for retries.py (see flow.pxd): every bind and release counts the requests
# in flight here, through the typed ``ctx.retries``.

cdef class RetryBudget:
    cdef public long in_flight, retrying
    cdef public double earned
    cdef object _jitter

    cpdef bound(self, bint first_attempt)
    cpdef bint try_take(self) except -1
    cpdef give_back(self)
    cpdef double backoff(self) except? -1
