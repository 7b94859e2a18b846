# Cython declarations for client.py (see flow.pxd).

cimport cython

from gateway.proxy.accounting cimport record
from gateway.proxy.exchange cimport Exchange
from gateway.proxy.flow cimport FlowControl
from gateway.proxy.http cimport valid_host
from gateway.proxy.request_head cimport (
    RequestFields,
    field_block,
    read_fields,
    sliced_field_lines,
    upstream_head,
)
from gateway.proxy.sides cimport ClientSide
from gateway.router cimport decide, is_write

cdef class ClientConnection(ClientSide):
    cdef public FlowControl flow
    cdef public Exchange parsing
    cdef public object parser, transport, _fresh_read
    cdef public bytes peer, _url
    cdef public list exchanges, _fields
    cdef public bint _reading_head
    cdef public double deadline
    cdef public Py_ssize_t _head_bytes

    cpdef _note_read(self, data)
    cpdef _feed(self, data)
    cpdef _advance(self)
    cpdef bint _buffering(self) except -1
    # The request head, once complete: llhttp calls on_headers_complete as a Python method;
    # the steps it takes are C calls on typed arguments.
    @cython.locals(exchange=Exchange, fields=RequestFields, sliced=bytes, parsed=list)
    cpdef on_headers_complete(self)
    cpdef _read_connection_options(self, Exchange exchange, RequestFields fields)
    cpdef _route(self, Exchange exchange, RequestFields fields, topology)
    cpdef _rate_limit(self, Exchange exchange, decision, bytes raw_key, topology)
    cpdef bytes _upstream_head(self, Exchange exchange, list parsed, RequestFields fields, topology, bytes sliced)
    # ClientSide
    cpdef send(self, data)
    cpdef exchange_done(self, exchange, double now)
    cpdef abort(self, exchange)
    cpdef refuse(self, exchange, refusal)
    cpdef upstream_full(self, bint full)
    cpdef update_reading(self)
    cpdef resume(self, exchange)
    cpdef bint writable(self) except -1
