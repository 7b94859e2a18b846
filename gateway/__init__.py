"""shardgate: a sharding HTTP gateway.

``SHARDGATE_PURE_PYTHON=1`` makes every ``gateway.*`` module load from its ``.py`` source even
where compiled extension modules sit beside it (see gateway/build.py). It must act before any
other gateway module is imported, hence here.
"""

from gateway.build import install_source_only_finder, pure_python_requested

if pure_python_requested():
    install_source_only_finder()
