# Cython declarations for ratelimit.py (see flow.pxd): a request under rate limits takes its
# tokens through C calls (the client cimports RateLimiter through context.pxd).

cdef class Bucket:
    cdef public double tokens, stamp

cdef class Limit:
    cdef public str name
    cdef public double rate, burst, quota
    cdef public long window

    cpdef Bucket new_bucket(self)
    cpdef double take(self, Bucket bucket, double now) except -1
    cpdef give_back(self, Bucket bucket)
    cpdef refusal(self, Bucket bucket, double wait)

cdef class KeyBuckets:
    cdef Py_ssize_t _generation
    cdef dict _young, _old

    cpdef Bucket get(self, bytes key, Limit limit, double now)

cdef class RateLimiter:
    cdef object _metrics, _settings
    cdef int _share, _max_keys
    cdef public bint active, redis_wanted
    cdef public object remote, per_key_exact
    cdef Limit _global, _kept_global, _per_group, _per_key
    cdef Bucket _global_bucket
    cdef dict _group_buckets
    cdef KeyBuckets _key_buckets

    cpdef check(self, str group, bytes key, double now)
    cpdef _check_group(self, str group, double now)
    cpdef check_key_locally(self, str group, bytes key, double now)
    cpdef give_back(self, str group)
    cpdef _give_back_global(self)
    cpdef _refused(self, Limit limit, Bucket bucket, double wait)
