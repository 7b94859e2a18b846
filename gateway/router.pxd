# Cython declarations for router.py (see gateway/proxy/flow.pxd): the decisions made per request
# are cpdef, so that the client connection (which cimports them) calls them as C functions;
# Python callers (the admin API, `shardgate route`, tests) import them by name as before.

cpdef bint is_write(topology, bytes method, bytes operation) except -1
cpdef owner_group(topology, bytes raw_key)
cpdef decide(topology, bytes method, bytes raw_key, bytes operation)
cpdef moving_to(handoff, bytes raw_key, str owner)
