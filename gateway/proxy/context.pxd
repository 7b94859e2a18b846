# Cython declarations for context.py (see flow.pxd): read on every request through the typed
# ``ctx`` attribute of both connections.

from gateway.proxy.health cimport Outliers
from gateway.proxy.ratelimit cimport RateLimiter
from gateway.proxy.retries cimport RetryBudget

cdef class ProxyContext:
    cdef public object loop, tracing, access_log, holder, metrics, limits, next_id, pools, _sweeper
    cdef public object read_state_soon
    cdef public Outliers health
    cdef public RateLimiter limiter
    cdef public RetryBudget retries
    cdef public object redis_limits
    cdef public double asked_for_state
    cdef public Py_ssize_t body_limit_digits
    cdef public set clients, upstreams, held
    cdef public bint draining, closing
    cdef public double sweep_interval
