# Cython declarations for request_head.py (see flow.pxd).
#
# The field actions are C ints here, so that classifying a field and the elif chain of _note
# are C comparisons; in the compiled module they are not Python attributes (nothing imports
# them: they only travel as the int values of a topology's header_actions).

cimport cython

from gateway.proxy.http cimport valid_request_id

cdef int FORWARD, DROP, KEY, CONNECTION, REQUEST_ID, FORWARDED_FOR, FORWARDED_PROTO, FORWARDED_HOST
cdef int OPERATION, HOST, TRACEPARENT, TRACESTATE, VIA, EXPECT, CONTENT_LENGTH, TRANSFER_ENCODING
cdef int NOT_CACHED

cdef class RequestFields:
    cdef public bytes key, host, operation, request_id, forwarded_for, via, traceparent, tracestate
    cdef public Py_ssize_t key_count, host_count, request_ids, traceparent_at
    cdef public object content_length  # int(value) of up to the limit's digits and more
    cdef public bint has_proto, has_forwarded_host, has_connection, expect_continue, chunked
    cdef public object connection_names  # a frozenset, or a set once a Connection names fields
    cdef public list removed

    cpdef remove(self, Py_ssize_t index)

@cython.locals(read=RequestFields, index=Py_ssize_t, action=int)
cpdef RequestFields read_fields(fields, dict actions, topology, Py_ssize_t length_digits)

cdef _note(RequestFields read, int action, Py_ssize_t index, bytes value, Py_ssize_t length_digits)
cdef _note_removed(RequestFields read, int action, Py_ssize_t index, bytes value)

cpdef bytes field_block(bytes raw, fields, list removed)

@cython.locals(start=Py_ssize_t, line_end=Py_ssize_t)
cpdef bytes sliced_field_lines(bytes read)

@cython.locals(gone=list, lines=list, index=Py_ssize_t)
cpdef bytes without_lines(bytes raw, list removed)

cpdef bytes upstream_head(
    bytes request_line,
    bytes forwarded,
    RequestFields read,
    bytes request_id,
    bytes peer,
    bytes epoch,
    bytes traceparent,
    bint http10,
)
