# Cython declarations for exchange.py (see flow.pxd). ``client`` is typed by its interface
# (sides.ClientSide), so the exchange calls its client connection through a C vtable without
# importing client.py (which imports this module).

cimport cython

from gateway.proxy.pool cimport PodLink
from gateway.proxy.response_head cimport connection_field, finish_head
from gateway.proxy.sides cimport ClientSide, ResponseSink
from gateway.proxy.upstream cimport UpstreamConnection

cpdef bint moving_in_flight(Exchange exchange, handoff) except -1

cdef class Exchange(ResponseSink):
    cdef public ClientSide client
    cdef public UpstreamConnection upstream
    cdef public object decision, refusal, error, pod, served_by, span, traceparent, dechunker
    cdef public double start_time, held_until
    cdef public int state, status, attempts
    cdef public bytes rid, method, target
    cdef public list pending
    cdef public object key, operation, sent_body
    cdef public str fenced_by
    cdef public long fenced_generation
    cdef public Py_ssize_t pending_bytes, body_bytes
    cdef public bint chunked, keep_alive, is_write, expect_continue, resent, on_trial, limit_pending, retrying

    cpdef head_complete(self, method)
    cpdef add_body(self, data)
    cpdef body_complete(self)
    cpdef flush_body(self)
    cpdef list take_pending(self)
    cpdef keep_for_resend(self, list sent)
    cpdef bint may_resend(self) except -1
    cpdef bind(self, pod)
    cpdef release(self)
    cpdef start(self)
    cpdef limit_decided(self, refusal)
    cpdef decide_held(self)
    cpdef long _view_generation(self) except? -1
    cpdef double _hold_seconds(self) except? -1
    cpdef decide_again(self)
    cpdef route_on(self, decision)
    @cython.locals(link=PodLink)
    cpdef dispatch(self, exclude, no_pod=*)
    cpdef _read_elsewhere(self, exclude)
    cpdef bint _another_pod_usable(self) except -1
    cpdef bint retry_after_failure(self, no_pod) except -1
    cpdef _retry_now(self, failed, no_pod)
    cpdef send_on(self, UpstreamConnection conn, double now)
    # ResponseSink
    cpdef response_head(self, bytes kept, int status, framing, body, bytes group)
    cpdef _pod_answered(self, pod, int status, bytes kept)
    cpdef fenced(self)
    cpdef response_body(self, data)
    cpdef response_complete(self, double now)
    cpdef upstream_lost(self, bint reused_connection, bint until_close)
    cpdef upstream_invalid(self)
    cpdef upstream_timeout(self)
    cpdef internal_error(self)
    cpdef upstream_full(self, bint full)
    cpdef bint client_writable(self) except -1
