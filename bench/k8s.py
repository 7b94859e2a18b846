"""The gateway's Kubernetes config source for the benchmark: the API-server double and its objects.

shardgate runs as in a cluster (`--configmap shardgate-shards --namespace shards`, KUBECONFIG
pointing at the double of tests/k8s/apiserver.py), so its measured process holds the Kubernetes
client and its two watches (the ConfigMap; the groups' EndpointSlices). The double runs in a
process of its own (`python -m tests.k8s.serve`), started and stopped by the harness like the
other servers.

Objects: the ConfigMap with `shards.yaml` (3 groups, each `service: data-writer-group-N`,
`port: http`) and one EndpointSlice per pod. An EndpointSlice's ports apply to every endpoint in
it, and the 6 backends share 127.0.0.1 with a port each, so each pod gets a slice of its own;
the gateway merges the slices of one Service (label `kubernetes.io/service-name`) into the
group's pods, as it does in a cluster where a Service has several slices.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.configs import (
    CONFIGMAP,
    HOST,
    NAMESPACE,
    PORT_NAME,
    group_ports,
    render_shard_config,
    service_name,
)
from bench.procs import Managed, Supervisor, wait_until

CONFIG_KEY = "shards.yaml"


def fixtures(backend_ports: Sequence[int]) -> dict[str, Any]:
    """The ConfigMap and the EndpointSlices (API shape) for the backends, as tests.k8s.serve loads them."""
    slices = []
    for group, ports in enumerate(group_ports(backend_ports), 1):
        service = service_name(group)
        for pod, port in enumerate(ports, 1):
            slices.append(
                {
                    "namespace": NAMESPACE,
                    "name": f"{service}-pod{pod}",
                    "service": service,
                    "endpoints": [
                        {
                            "addresses": [HOST],
                            "conditions": {"ready": True, "serving": True, "terminating": False},
                            "targetRef": {"kind": "Pod", "name": f"{service}-{pod}"},
                        }
                    ],
                    "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}],
                }
            )
    configmap = {"namespace": NAMESPACE, "name": CONFIGMAP, "data": {CONFIG_KEY: render_shard_config()}}
    return {"configmaps": [configmap], "endpointslices": slices}


def start_apiserver(
    sup: Supervisor,
    workdir: Path,
    python: str,
    port: int,
    backend_ports: Sequence[int],
    repo_root: Path,
    timeout: float = 30.0,
) -> tuple[Managed, Path]:
    """Start the double with the benchmark's objects; return it and its kubeconfig, once written."""
    fixture_file = workdir / "k8s-fixtures.json"
    fixture_file.write_text(json.dumps(fixtures(backend_ports), indent=2) + "\n")
    kubeconfig = workdir / "kubeconfig"
    argv = [
        python,
        "-m",
        "tests.k8s.serve",
        "--fixtures",
        str(fixture_file),
        "--port",
        str(port),
        "--kubeconfig",
        str(kubeconfig),
        "--namespace",
        NAMESPACE,
    ]
    managed = sup.start("apiserver", argv, cwd=repo_root)
    # The kubeconfig is renamed into place once the double listens and holds every object.
    wait_until(kubeconfig.exists, what="the Kubernetes API-server double", timeout=timeout, watch=[managed])
    return managed, kubeconfig
