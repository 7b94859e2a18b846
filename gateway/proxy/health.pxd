# Cython declarations for health.py (see flow.pxd): every response tells ``Outliers.answered``
# and every bind checks a pod's trial, so the calls from the exchange are C calls.

cdef class PodHealth:
    cdef public int consecutive_5xx, ejections
    cdef public double ejected_until, trusted_at
    cdef public object last_reason, timer

cdef class Outliers:
    cdef object _loop, _holder, _metrics, _jitter
    cdef dict _pods, _settings_of

    cpdef failed(self, pod, str reason, bint trial)
    cpdef answered(self, pod, bint server_error, bint trial)
    cpdef trial_started(self, pod)
    cpdef trial_abandoned(self, pod)
