# Cython declarations for accounting.py (see flow.pxd): the exchange and the context are typed,
# so what a finished exchange left is read from their C fields. (A cimport imports at module
# load; accounting.py imports neither module itself, so this adds no cycle.)

from gateway.proxy.context cimport ProxyContext
from gateway.proxy.exchange cimport Exchange

cpdef record(ProxyContext ctx, Exchange exchange, int status, double now, bytes peer)
