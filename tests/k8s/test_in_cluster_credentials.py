"""The gateway in a pod: the service account's token, CA and namespace files.

The API-server double serves HTTPS with a certificate from a CA made for the test (trustme) and
answers only ``Authorization: Bearer <the token>`` (401 otherwise). The gateway runs with
``KUBERNETES_SERVICE_HOST`` / ``KUBERNETES_SERVICE_PORT`` set and no kubeconfig, and
``SHARDGATE_SERVICE_ACCOUNT_DIR`` pointing at a directory laid out as the kubelet lays out
``/var/run/secrets/kubernetes.io/serviceaccount`` (``token``, ``ca.crt``, ``namespace``).
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.k8s.apiserver import FakeApiServer, endpoint, port
from tests.k8s.conftest import (
    CONFIGMAP,
    NS,
    Client,
    GatewayFactory,
    Group,
    Recipe,
    shard_config,
    wait_for,
)
from tests.k8s.pods import PodFarm
from tests.support import close_and_report

TOKEN = "in-cluster-service-account-token"
GROUPS = [Group("group-a", "svc-a"), Group("group-b", "svc-b")]


@dataclass
class Cluster:
    api: FakeApiServer
    ca: Any  # trustme.CA: the cluster's CA, which signed the API server's certificate
    farm: PodFarm

    def service_account(
        self, directory: Path, *, token: str = TOKEN, ca: Any = None, namespace: str = NS
    ) -> Path:
        """A service-account directory as the kubelet mounts it in a pod."""
        directory.mkdir(parents=True)
        (directory / "token").write_text(token)
        (directory / "ca.crt").write_bytes((ca or self.ca).cert_pem.bytes())
        (directory / "namespace").write_text(namespace)
        return directory

    def env(self, directory: Path) -> dict[str, str]:
        """What a pod's environment says about the API server and where the files are."""
        return {
            "KUBERNETES_SERVICE_HOST": self.api.host,
            "KUBERNETES_SERVICE_PORT": str(self.api.port),
            "SHARDGATE_SERVICE_ACCOUNT_DIR": str(directory),
        }

    def publish(self, namespace: str = NS) -> None:
        """The shard config and each group's EndpointSlice (two pods each) in ``namespace``."""
        self.api.put_configmap(namespace, CONFIGMAP, {"shards.yaml": shard_config(GROUPS)})
        for n, group in enumerate(GROUPS):
            hosts = self.farm.hosts[2 * n : 2 * n + 2]
            self.api.put_endpointslice(
                namespace,
                f"{group.service}-abcde",
                group.service,
                [endpoint(h, pod=f"{group.service}-{i}") for i, h in enumerate(hosts)],
                [port(self.farm.port, "http")],
            )

    def trusting_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    with FakeApiServer(token=TOKEN, ssl_context=server_context) as api, PodFarm(4) as farm:
        yield Cluster(api, ca, farm)


@pytest.fixture
def gateways(cluster: Cluster, tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(cluster.api, tmp_path)
    yield factory
    close_and_report(factory)


def gateway_requests(api: FakeApiServer) -> list[Any]:
    return [r for r in api.requests() if r.verb in ("list", "watch")]


@pytest.mark.timeout(90)
def test_in_a_pod_the_gateway_uses_the_service_account_token_and_ca(
    cluster: Cluster, gateways: GatewayFactory, tmp_path: Path
) -> None:
    cluster.publish()
    directory = cluster.service_account(tmp_path / "serviceaccount")
    gw = gateways(kubeconfig=False, env=cluster.env(directory))  # returns once /readyz is 200

    # It routes on the ConfigMap and EndpointSlices it read over HTTPS.
    recipe = Recipe(GROUPS)
    client = Client(gw.port)
    for key in recipe.keys_of("group-a", 2) + recipe.keys_of("group-b", 2):
        result = client.write(key)
        assert result.status == 200 and result.group == recipe.owner(key), result
    client.close()
    seen = gateway_requests(cluster.api)
    assert {r.resource for r in seen} == {"configmaps", "endpointslices"}, seen
    # Every call carried the token from the file (the in-cluster loader writes "bearer").
    assert {r.authorization.lower() for r in seen if r.authorization} == {f"bearer {TOKEN}"}
    assert all(r.authorization for r in seen), seen
    # The double does refuse a call without it: the token is what let the gateway in.
    conn = http.client.HTTPSConnection(
        cluster.api.host, cluster.api.port, context=cluster.trusting_context(), timeout=10
    )
    try:
        conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps")
        assert conn.getresponse().status == 401
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_another_token_or_another_ca_does_not_get_in(
    cluster: Cluster, gateways: GatewayFactory, tmp_path: Path
) -> None:
    """The files are what the gateway uses: a token the server does not know gets 401s, and a
    CA that did not sign the server's certificate fails the TLS handshake."""
    cluster.publish()
    wrong_token = cluster.service_account(tmp_path / "wrong-token", token="not-the-token")
    gw = gateways(kubeconfig=False, env=cluster.env(wrong_token), ready=False)
    assert wait_for(lambda: "401" in str(gw.watches()["configmap/shardgate"]["last_error"]), timeout=15)
    assert gw.admin_status("/readyz") == 503
    refused = gateway_requests(cluster.api)
    assert refused and all(r.authorization == "bearer not-the-token" for r in refused), refused

    other_ca = trustme.CA()
    untrusted = cluster.service_account(tmp_path / "other-ca", ca=other_ca)
    before = len(gateway_requests(cluster.api))
    gw2 = gateways(kubeconfig=False, env=cluster.env(untrusted), ready=False)
    assert wait_for(
        lambda: "CERTIFICATE_VERIFY_FAILED" in str(gw2.watches()["configmap/shardgate"]["last_error"]),
        timeout=15,
    ), gw2.watches()
    assert gw2.admin_status("/readyz") == 503
    # No request of its made it through the handshake (the first gateway's keep retrying).
    assert all(r.authorization == "bearer not-the-token" for r in gateway_requests(cluster.api)[before:])


@pytest.mark.timeout(90)
def test_without_a_namespace_flag_the_service_account_namespace_file_names_it(
    cluster: Cluster, gateways: GatewayFactory, tmp_path: Path
) -> None:
    cluster.publish(namespace="team-b")  # nothing in the harness's usual namespace
    directory = cluster.service_account(tmp_path / "serviceaccount", namespace="team-b")
    gw = gateways(kubeconfig=False, namespace=None, env=cluster.env(directory))
    assert gw.ring()["config"]["source"] == f"configmap:team-b/{CONFIGMAP}"
    assert {r.namespace for r in gateway_requests(cluster.api)} == {"team-b"}
    key = Recipe(GROUPS).keys_of("group-b", 1)[0]
    client = Client(gw.port)
    assert client.write(key).group == "group-b"
    client.close()
