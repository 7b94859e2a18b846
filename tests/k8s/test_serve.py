"""`python -m tests.k8s.serve`: the API-server double as a process of its own (used by bench/)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubernetes import client, config

from tests.k8s.apiserver import FakeApiServer, endpoint, port
from tests.k8s.serve import load_fixtures

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = {
    "configmaps": [{"namespace": "shards", "name": "cfg", "data": {"shards.yaml": "version: 1\n"}}],
    "endpointslices": [
        {
            "namespace": "shards",
            "name": "svc-pod1",
            "service": "svc",
            "endpoints": [endpoint("127.0.0.1", pod="svc-1")],
            "ports": [port(9001)],
        }
    ],
}


def test_load_fixtures_puts_every_object() -> None:
    with FakeApiServer() as api:
        assert load_fixtures(api, FIXTURES) == 2
        configmap = api.get_object("configmaps", "shards", "cfg")
        slice_ = api.get_object("endpointslices", "shards", "svc-pod1")
    assert configmap is not None and configmap["data"] == {"shards.yaml": "version: 1\n"}
    assert slice_ is not None and slice_["metadata"]["labels"]["kubernetes.io/service-name"] == "svc"
    assert slice_["ports"] == [{"name": "http", "port": 9001, "protocol": "TCP"}]


def test_serves_the_fixtures_until_sigterm(tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures.json"
    fixtures.write_text(json.dumps(FIXTURES))
    kubeconfig = tmp_path / "kubeconfig"
    argv = ["--fixtures", str(fixtures), "--kubeconfig", str(kubeconfig), "--namespace", "shards"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.k8s.serve", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not kubeconfig.exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "the double wrote no kubeconfig"
            time.sleep(0.05)
        configuration = client.Configuration()  # not the process-wide default: other tests use that
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        api = client.ApiClient(configuration)
        slices = client.DiscoveryV1Api(api).list_namespaced_endpoint_slice("shards")
        assert [item.metadata.name for item in slices.items] == ["svc-pod1"]
        cfg = client.CoreV1Api(api).read_namespaced_config_map("cfg", "shards")
        assert cfg.data == {"shards.yaml": "version: 1\n"}
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, output
    assert "listening on http://127.0.0.1:" in output
