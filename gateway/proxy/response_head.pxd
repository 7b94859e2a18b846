# Cython declarations for response_head.py (see flow.pxd). Only what runs per response is
# typed: the head rewrite, the framing and the final join.

cimport cython

cdef class Framing:
    cdef public bint chunked, dechunk, until_close

@cython.locals(end=Py_ssize_t, at=Py_ssize_t, stop=Py_ssize_t, line_end=Py_ssize_t, lower=bytes, kept=bytes)
cpdef tuple client_head(bytes head)

@cython.locals(has_length=bint, chunked=bint, bodiless=bint)
cpdef Framing framing(bytes lower, int status, bint head_only, bint http10)

cpdef bytes finish_head(bytes kept, bytes group, bytes request_id, bytes connection, body)

cpdef bytes connection_field(bint close, bint http10)
