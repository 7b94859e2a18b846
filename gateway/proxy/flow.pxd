# Cython declarations for flow.py. The .py file is the source and runs unchanged as plain
# Python; this file only shapes the compiled build (gateway/build.py lists what is compiled).
# A cdef class has no __dict__: every attribute it sets is declared here (one missing is an
# AttributeError in the compiled build only, which the compiled test run catches). `public`:
# readable and writable from Python code and tests, as before.

cdef class FlowControl:
    cdef public object transport
    cdef public int read_blocks
    cdef public bint write_paused, stopped

    cpdef bint block_reading(self, int reason) except -1
    cpdef bint unblock_reading(self, int reason) except -1
    cpdef set_block(self, int reason, bint blocked)
