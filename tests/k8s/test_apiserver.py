"""The API-server double, driven through the real official ``kubernetes`` client.

These tests pin both the double's wire protocol and the client behaviours the gateway's
Kubernetes watcher relies on (how ``watch.Watch().stream`` surfaces BOOKMARK, 410, a dropped
connection, a server-side timeout, an injected error and a server that is down). What they
establish about ``kubernetes`` 37 ``watch.Watch().stream(func, ..., **kwargs)``:

* BOOKMARK is *yielded* as ``{"type": "BOOKMARK", "object": <raw dict>, "raw_object": <same>}``
  (not deserialized) and sets ``Watch.resource_version`` to the bookmark's version.
* Every other event updates ``Watch.resource_version`` from its object.
* An ERROR event raises ``ApiException(status=obj["code"], reason="<reason>: <message>")``
  (``body`` None), except a 410 *without* ``timeout_seconds``: that is retried once, silently,
  with the same ``resource_version``, and raises on the second 410.
* A stream the server ends cleanly ends the generator when ``timeout_seconds`` was given;
  without it the client re-watches from ``Watch.resource_version`` forever.
* A connection closed without the last chunk raises ``urllib3.exceptions.ProtocolError``
  (``Response ended prematurely``); ``_request_timeout=(connect, read)`` with no data for
  ``read`` seconds raises ``urllib3.exceptions.ReadTimeoutError``; a refused connection raises
  ``urllib3.exceptions.MaxRetryError`` (reason ``NewConnectionError``), never ``ApiException``.
* A non-2xx answer raises ``ApiException`` (a subclass per code: ``NotFoundException``,
  ``ServiceException`` for 5xx, ...) with the ``Status`` JSON in ``body``; urllib3's default
  retries silently repeat 413/429/503 answers that carry ``Retry-After`` (3 times).

And about its writes: ``create_*`` and ``replace_*`` send JSON without a ``Content-Type``
header; ``patch_*`` with a dict body sends ``application/strategic-merge-patch+json`` unless
``_content_type`` says otherwise; a ``datetime`` (a Lease's ``renew_time``) is sent as its
``isoformat()``. A connection closed before any answer raises ``urllib3`` ``ProtocolError``
for POST/PATCH and ``MaxRetryError`` (after 3 silent retries) for the idempotent methods.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.k8s.apiserver import (
    OPTIMISTIC_LOCK_MESSAGE,
    SERVICE_NAME_LABEL,
    FakeApiServer,
    SelectorError,
    endpoint,
    merge_patch,
    micro_time,
    parse_field_selector,
    parse_label_selector,
    port,
    wait_until,
)

NS = "shards"
WAIT = 5.0


def selector(service: str) -> str:
    return f"{SERVICE_NAME_LABEL}={service}"


class WatchCollector:
    """Runs ``watch.Watch().stream(func, ...)`` on a thread and records what it yields/raises."""

    def __init__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.watch = watch.Watch()
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() when each event was yielded
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(func, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            for event in self.watch.stream(func, *args, **kwargs):
                with self._cond:
                    self.events.append(event)
                    self.times.append(time.monotonic())
                    self._cond.notify_all()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()
            with self._cond:
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: predicate(self.events) or self.done.is_set(), timeout
            ) and predicate(self.events)

    def wait_events(self, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        assert self.wait_for(lambda evs: len(evs) >= n, timeout), (self.types(), self.error)
        return list(self.events)

    def finish(self, timeout: float = WAIT) -> None:
        assert self.done.wait(timeout), "watch stream did not end"

    def types(self) -> list[str]:
        with self._cond:
            return [e["type"] for e in self.events]

    def names(self) -> list[tuple[str, str]]:
        with self._cond:
            return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in self.events]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def api_client(api: FakeApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    cfg = client.Configuration()
    config.load_kube_config(
        config_file=str(api.kubeconfig(tmp_path / "kubeconfig")), client_configuration=cfg
    )
    with client.ApiClient(cfg) as api_client:
        yield api_client


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


@pytest.fixture
def discovery(api_client: client.ApiClient) -> client.DiscoveryV1Api:
    return client.DiscoveryV1Api(api_client)


def put_slice(api: FakeApiServer, name: str, service: str, *ips: str) -> dict[str, Any]:
    return api.put_endpointslice(NS, name, service, [endpoint(ip, pod=f"pod-{ip}") for ip in ips], [port()])


def kube_configuration(path: Path) -> client.Configuration:
    """A client Configuration loaded from a kubeconfig, as a gateway process loads its own."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=cfg)  # type: ignore[no-untyped-call]
    return cfg


@pytest.fixture
def client_for(api: FakeApiServer, tmp_path: Path) -> Iterator[Callable[[str], client.ApiClient]]:
    """``client_for(token)``: an ApiClient with a kubeconfig of its own for client ``token``
    (accepted by the server), like one replica of a harness."""
    with contextlib.ExitStack() as stack:

        def make(token: str) -> client.ApiClient:
            api.add_token(token)
            path = api.kubeconfig(tmp_path / token / "kubeconfig", namespace=NS, token=token)
            api_client = client.ApiClient(kube_configuration(path))
            stack.callback(api_client.close)
            return api_client

        yield make


@pytest.fixture
def coordination(api_client: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api_client)


def status_of(error: ApiException) -> dict[str, Any]:
    """The ``Status`` an ApiException carries."""
    assert error.body is not None
    body = json.loads(error.body)
    assert isinstance(body, dict) and body["kind"] == "Status"
    return body


def raw_request(
    api: FakeApiServer,
    method: str,
    path: str,
    body: Any = None,
    content_type: str | None = "application/json",
    token: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request over a fresh connection: the status and the decoded JSON answer."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
    headers = {"Authorization": f"Bearer {token or api.token}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        assert isinstance(answer, dict)
        return resp.status, answer
    finally:
        conn.close()


def raw_get(api: FakeApiServer, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {api.token}"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# list / get


def test_kubeconfig_is_accepted_and_the_bearer_token_is_sent(
    api: FakeApiServer, core: client.CoreV1Api, tmp_path: Path
) -> None:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(api.kubeconfig(tmp_path / "kc")), client_configuration=cfg)
    assert cfg.host == api.url
    core.list_namespaced_config_map(NS)
    assert api.requests()[-1].authorization == f"Bearer {api.token}"
    status, _, body = raw_get(api, "/version")
    assert status == 200 and json.loads(body)["major"] == "1"
    conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
    conn.request("GET", f"/api/v1/namespaces/{NS}/configmaps")
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["reason"] == "Unauthorized"
    conn.close()


def test_list_endpointslices_by_service_returns_items_and_a_resource_version(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1", "10.0.0.2")
    put_slice(api, "users-b", "users", "10.0.0.3")
    put_slice(api, "orders-a", "orders", "10.0.1.1")
    api.put_endpointslice("other", "users-x", "users", [endpoint("10.9.9.9")], [port()])

    result = discovery.list_namespaced_endpoint_slice(NS, label_selector=selector("users"))
    assert result.kind == "EndpointSliceList" and result.api_version == "discovery.k8s.io/v1"
    assert result.metadata.resource_version == api.resource_version
    assert sorted(s.metadata.name for s in result.items) == ["users-a", "users-b"]
    first = next(s for s in result.items if s.metadata.name == "users-a")
    assert first.kind is None  # the real server omits list items' kind/apiVersion
    assert first.address_type == "IPv4"
    assert [e.addresses for e in first.endpoints] == [["10.0.0.1"], ["10.0.0.2"]]
    assert (
        first.endpoints[0].conditions.ready is True and first.endpoints[0].target_ref.name == "pod-10.0.0.1"
    )
    assert [(p.name, p.port, p.protocol) for p in first.ports] == [("http", 8080, "TCP")]
    assert first.metadata.labels[SERVICE_NAME_LABEL] == "users"
    assert first.metadata.uid and first.metadata.creation_timestamp is not None
    assert int(first.metadata.resource_version) < int(result.metadata.resource_version)

    both = discovery.list_namespaced_endpoint_slice(
        NS, label_selector=f"{SERVICE_NAME_LABEL} in (users, orders)"
    )
    assert len(both.items) == 3
    assert api.count(verb="list", resource="endpointslices") == 2
    assert api.count(verb="watch") == 0


def test_configmap_get_and_list_with_field_selector(api: FakeApiServer, core: client.CoreV1Api) -> None:
    created = api.put_configmap(NS, "shardgate", {"ring.yaml": "groups: []"}, labels={"app": "shardgate"})
    api.put_configmap(NS, "unrelated", {"x": "y"})

    got = core.read_namespaced_config_map("shardgate", NS)
    assert got.kind == "ConfigMap" and got.data == {"ring.yaml": "groups: []"}
    assert got.metadata.resource_version == created["metadata"]["resourceVersion"]
    assert got.metadata.uid == created["metadata"]["uid"]

    listed = core.list_namespaced_config_map(NS, field_selector="metadata.name=shardgate")
    assert listed.kind == "ConfigMapList" and [c.metadata.name for c in listed.items] == ["shardgate"]
    assert listed.metadata.resource_version == api.resource_version

    with pytest.raises(ApiException) as missing:
        core.read_namespaced_config_map("nope", NS)
    assert missing.value.status == 404
    assert json.loads(missing.value.body)["reason"] == "NotFound"
    with pytest.raises(ApiException) as bad:
        core.list_namespaced_config_map(NS, field_selector="spec.nope=1")
    assert bad.value.status == 400
    assert api.count(verb="get", resource="configmaps") == 2


def test_put_is_a_no_op_when_nothing_changes_and_delete_bumps_the_version(api: FakeApiServer) -> None:
    first = api.put_configmap(NS, "c", {"a": "1"})
    assert api.put_configmap(NS, "c", {"a": "1"}) == first
    second = api.put_configmap(NS, "c", {"a": "2"})
    assert int(second["metadata"]["resourceVersion"]) == int(first["metadata"]["resourceVersion"]) + 1
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    gone = api.delete_configmap(NS, "c")
    assert (
        gone is not None
        and int(gone["metadata"]["resourceVersion"]) == int(second["metadata"]["resourceVersion"]) + 1
    )
    assert api.delete_configmap(NS, "c") is None
    assert api.put_configmap(NS, "c", {"a": "1"})["metadata"]["uid"] != first["metadata"]["uid"]


def test_label_and_field_selector_parsing() -> None:
    match = parse_label_selector("app=gw, tier in (a, b),env!=prod,!legacy,zone")
    assert match({"app": "gw", "tier": "a", "zone": "z"})
    assert not match({"app": "gw", "tier": "c", "zone": "z"})
    assert not match({"app": "gw", "tier": "a", "zone": "z", "env": "prod"})
    assert not match({"app": "gw", "tier": "a", "zone": "z", "legacy": "1"})
    assert not match({"app": "gw", "tier": "a"})
    assert parse_label_selector("tier notin (a)")({})
    assert parse_label_selector("a==b")({"a": "b"})
    assert parse_label_selector("")({"anything": "x"})
    for bad in ("a in ()", "a in (b", "=x", "a,,b"):
        with pytest.raises(SelectorError):
            parse_label_selector(bad)
    by_name = parse_field_selector("metadata.name=x,metadata.namespace!=kube-system")
    assert by_name({"metadata": {"name": "x", "namespace": "default"}})
    assert not by_name({"metadata": {"name": "x", "namespace": "kube-system"}})
    with pytest.raises(SelectorError):
        parse_field_selector("status.phase=Running")


# ---------------------------------------------------------------------------------------------
# watch


def test_watch_from_list_version_sees_later_changes_of_the_selected_service_only(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    rv = discovery.list_namespaced_endpoint_slice(
        NS, label_selector=selector("users")
    ).metadata.resource_version
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=selector("users"),
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    put_slice(api, "users-b", "users", "10.0.0.2")  # ADDED
    put_slice(api, "orders-a", "orders", "10.0.1.1")  # other service: not seen
    put_slice(api, "users-a", "users", "10.0.0.1", "10.0.0.3")  # MODIFIED
    put_slice(api, "orders-a", "orders", "10.0.1.2")
    api.delete_endpointslice(NS, "orders-a")
    api.delete_endpointslice(NS, "users-b")  # DELETED: last, so everything before it was sent
    events = collector.wait_events(3)
    assert collector.names() == [("ADDED", "users-b"), ("MODIFIED", "users-a"), ("DELETED", "users-b")]
    assert all(isinstance(e["object"], client.V1EndpointSlice) for e in events)
    assert events[0]["object"].kind == "EndpointSlice"  # watch objects carry their kind
    assert events[1]["object"].endpoints[1].addresses == ["10.0.0.3"]
    assert collector.watch.resource_version == events[2]["object"].metadata.resource_version
    assert collector.watch.resource_version == api.resource_version
    assert not collector.done.is_set()

    query = api.requests()[-1].query
    assert (
        query["watch"] == "true" and query["resourceVersion"] == rv and query["allowWatchBookmarks"] == "true"
    )
    assert query["labelSelector"] == selector("users") and query["timeoutSeconds"] == "30"
    api.drop_watches()
    collector.finish()


def test_watch_replays_history_newer_than_the_given_version(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    rv = api.resource_version
    put_slice(api, "users-a", "users", "10.0.0.2")
    put_slice(api, "orders-a", "orders", "10.0.1.1")
    put_slice(api, "users-b", "users", "10.0.0.3")
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=selector("users"),
        resource_version=rv,
        timeout_seconds=30,
    )
    collector.wait_events(2)
    assert collector.names() == [("MODIFIED", "users-a"), ("ADDED", "users-b")]
    api.drop_watches()
    collector.finish()


def test_watch_without_resource_version_starts_with_synthetic_added_events(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    put_slice(api, "users-a", "users", "10.0.0.2")
    put_slice(api, "users-b", "users", "10.0.0.3")
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice, NS, label_selector=selector("users"), timeout_seconds=30
    )
    collector.wait_events(2)
    assert collector.names() == [("ADDED", "users-a"), ("ADDED", "users-b")]
    api.drop_watches()
    collector.finish()


def test_relabelled_slice_leaves_and_joins_the_selection(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "s1", "users", "10.0.0.1")
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=selector("users"),
        resource_version=api.resource_version,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    put_slice(api, "s1", "orders", "10.0.0.1")  # leaves "users": DELETED
    put_slice(api, "s1", "users", "10.0.0.1")  # back: ADDED
    events = collector.wait_events(2)
    assert collector.names() == [("DELETED", "s1"), ("ADDED", "s1")]
    deleted = events[0]["raw_object"]
    assert deleted["metadata"]["labels"][SERVICE_NAME_LABEL] == "users"  # previous content...
    assert (
        int(deleted["metadata"]["resourceVersion"])
        == int(events[1]["raw_object"]["metadata"]["resourceVersion"]) - 1
    )
    api.drop_watches()
    collector.finish()


def test_configmap_watch_by_field_selector(api: FakeApiServer, core: client.CoreV1Api) -> None:
    api.put_configmap(NS, "shardgate", {"v": "1"})
    rv = core.list_namespaced_config_map(
        NS, field_selector="metadata.name=shardgate"
    ).metadata.resource_version
    collector = WatchCollector(
        core.list_namespaced_config_map,
        NS,
        field_selector="metadata.name=shardgate",
        resource_version=rv,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    api.put_configmap(NS, "other", {"v": "1"})
    api.put_configmap(NS, "shardgate", {"v": "2"})
    api.delete_configmap(NS, "shardgate")
    events = collector.wait_events(2)
    assert collector.names() == [("MODIFIED", "shardgate"), ("DELETED", "shardgate")]
    assert isinstance(events[0]["object"], client.V1ConfigMap) and events[0]["object"].data == {"v": "2"}
    api.drop_watches()
    collector.finish()


def test_bookmarks_are_yielded_as_raw_dicts_and_advance_the_watch_resource_version(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    rv = api.resource_version
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=selector("users"),
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=30,
    )
    plain = WatchCollector(  # no allowWatchBookmarks: never gets one
        discovery.list_namespaced_endpoint_slice,
        NS,
        label_selector=selector("users"),
        resource_version=rv,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(2)
    put_slice(api, "orders-a", "orders", "10.0.1.1")  # not selected: only moves the global version
    assert api.send_bookmark() == 1
    events = collector.wait_events(1)
    bookmark = events[0]
    assert bookmark["type"] == "BOOKMARK"
    # Not deserialized: "object" is the raw dict (same as raw_object), kind + resourceVersion only.
    assert (
        bookmark["object"]
        == bookmark["raw_object"]
        == {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": api.resource_version},
        }
    )
    assert api.resource_version != rv
    assert collector.watch.resource_version == api.resource_version  # the client resumes from here

    put_slice(api, "users-b", "users", "10.0.0.2")
    assert plain.wait_events(1)[0]["type"] == "ADDED"
    assert plain.types() == ["ADDED"]
    api.drop_watches()
    collector.finish()
    plain.finish()


def test_periodic_bookmarks(tmp_path: Path) -> None:
    with FakeApiServer(bookmark_interval=0.1) as api:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(api.kubeconfig(tmp_path / "kc")), client_configuration=cfg)
        with client.ApiClient(cfg) as api_client:
            discovery = client.DiscoveryV1Api(api_client)
            collector = WatchCollector(
                discovery.list_namespaced_endpoint_slice,
                NS,
                resource_version=api.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=30,
            )
            assert collector.wait_for(lambda evs: len(evs) >= 3)
            assert set(collector.types()) == {"BOOKMARK"}
            api.drop_watches()
            collector.finish()


def test_watch_from_a_compacted_version_gets_410_in_a_200_stream(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    old = api.resource_version
    put_slice(api, "users-a", "users", "10.0.0.2")
    floor = api.compact()
    path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?watch=1&resourceVersion={old}"

    status, headers, body = raw_get(api, path)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert headers.get("transfer-encoding") == "chunked"
    lines = body.decode().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {old} ({floor})",
            "reason": "Expired",
            "code": 410,
        },
    }

    # With timeout_seconds the client does not retry: ApiException(410) straight away.
    before = api.count(verb="watch")
    with pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice, NS, resource_version=old, timeout_seconds=5
        ):
            pytest.fail("no event expected")
    assert expired.value.status == 410
    assert expired.value.reason == f"Expired: too old resource version: {old} ({floor})"
    assert api.count(verb="watch") == before + 1

    # Without timeout_seconds it silently retries once with the same version, then raises.
    with pytest.raises(ApiException) as again:
        for _ in watch.Watch().stream(discovery.list_namespaced_endpoint_slice, NS, resource_version=old):
            pytest.fail("no event expected")
    assert again.value.status == 410
    assert api.count(verb="watch") == before + 3
    assert [r.query["resourceVersion"] for r in api.requests()[-2:]] == [old, old]

    # The current version is still inside the window.
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice, NS, resource_version=floor, timeout_seconds=30
    )
    assert api.wait_for_watches(1)
    put_slice(api, "users-b", "users", "10.0.0.3")
    assert collector.wait_events(1)[0]["type"] == "ADDED"
    api.drop_watches()
    collector.finish()


def test_bounded_history_expires_old_versions() -> None:
    with FakeApiServer(history_limit=2) as api:
        start = api.resource_version
        for i in range(3):
            api.put_configmap(NS, "c", {"i": str(i)})
        status, _, body = raw_get(
            api, f"/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion={start}"
        )
        event = json.loads(body)
        assert status == 200 and event["type"] == "ERROR" and event["object"]["code"] == 410
        assert event["object"]["message"] == f"too old resource version: {start} ({int(start) + 1})"


def test_drop_watches_ends_the_stream_with_a_protocol_error(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        resource_version=api.resource_version,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    put_slice(api, "users-a", "users", "10.0.0.1")
    collector.wait_events(1)
    assert api.drop_watches() == 1
    collector.finish()
    assert isinstance(collector.error, urllib3.exceptions.ProtocolError)
    assert "ended prematurely" in str(collector.error)
    assert collector.types() == ["ADDED"]
    assert api.active_watches == 0


def test_server_side_timeout_ends_the_stream_cleanly(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    started = time.monotonic()
    events = list(
        watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice,
            NS,
            resource_version=api.resource_version,
            timeout_seconds=1,
        )
    )
    elapsed = time.monotonic() - started
    assert events == []
    assert 0.9 <= elapsed < 10.0
    assert wait_until(lambda: api.active_watches == 0)


def test_client_rewatches_from_its_last_version_when_a_stream_ends_without_timeout_seconds(
    tmp_path: Path,
) -> None:
    with FakeApiServer(default_watch_timeout=0.3) as api:
        cfg = client.Configuration()
        config.load_kube_config(config_file=str(api.kubeconfig(tmp_path / "kc")), client_configuration=cfg)
        with client.ApiClient(cfg) as api_client:
            discovery = client.DiscoveryV1Api(api_client)
            start = api.resource_version
            collector = WatchCollector(discovery.list_namespaced_endpoint_slice, NS, resource_version=start)
            assert api.wait_for_watches(1)
            put_slice(api, "users-a", "users", "10.0.0.1")
            seen = collector.wait_events(1)[0]["object"].metadata.resource_version
            assert wait_until(lambda: api.count(verb="watch") >= 3)
            # Watch.stop() from another thread shuts the socket down under the blocked read: the
            # generator then raises ProtocolError (or ends cleanly if it was between streams).
            collector.watch.stop()
            collector.finish()
            assert collector.error is None or isinstance(collector.error, urllib3.exceptions.ProtocolError)
            versions = [r.query["resourceVersion"] for r in api.requests() if r.verb == "watch"]
            assert versions[0] == start and versions[-1] == seen


def test_client_read_timeout_raises_read_timeout_error(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        for _ in watch.Watch().stream(
            discovery.list_namespaced_endpoint_slice,
            NS,
            resource_version=api.resource_version,
            timeout_seconds=30,
            _request_timeout=(2, 0.3),
        ):
            pytest.fail("no event expected")


# ---------------------------------------------------------------------------------------------
# faults


def test_fail_requests_raises_api_exception_with_that_status(
    api: FakeApiServer, discovery: client.DiscoveryV1Api, core: client.CoreV1Api
) -> None:
    api.fail_requests(2, status=503)
    for _ in range(2):
        with pytest.raises(ApiException) as failed:
            discovery.list_namespaced_endpoint_slice(NS)
        assert failed.value.status == 503
        body = json.loads(failed.value.body)
        assert body["kind"] == "Status" and body["reason"] == "ServiceUnavailable" and body["code"] == 503
    assert discovery.list_namespaced_endpoint_slice(NS).items == []

    api.fail_requests(1, status=500, verb="watch")
    core.list_namespaced_config_map(NS)  # not a watch: unaffected
    with pytest.raises(ApiException) as failed_watch:
        for _ in watch.Watch().stream(discovery.list_namespaced_endpoint_slice, NS, timeout_seconds=5):
            pytest.fail("no event expected")
    assert failed_watch.value.status == 500
    assert api.count(verb="list") == 4 and api.count(verb="watch") == 1


def test_retry_after_on_429_and_503_is_retried_by_urllib3(api: FakeApiServer, core: client.CoreV1Api) -> None:
    # urllib3's default Retry (3) honours Retry-After on 413/429/503: the client never sees one
    # such answer, it sees the 4th. Other codes, and answers without Retry-After, are not retried.
    api.fail_requests(1, status=429, retry_after=0)
    assert core.list_namespaced_config_map(NS).items == []
    assert api.count(verb="list") == 2
    api.reset_counts()
    api.fail_requests(10, status=503, retry_after=0)
    with pytest.raises(ApiException) as throttled:
        core.list_namespaced_config_map(NS)
    assert throttled.value.status == 503 and throttled.value.headers["Retry-After"] == "0"
    assert api.count(verb="list") == 4
    assert api.clear_failures() == 6
    api.reset_counts()
    api.fail_requests(1, status=500, retry_after=0)
    with pytest.raises(ApiException):
        core.list_namespaced_config_map(NS)
    assert api.count(verb="list") == 1


def test_set_down_refuses_connections_then_serves_again_on_the_same_port(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    put_slice(api, "users-a", "users", "10.0.0.1")
    assert len(discovery.list_namespaced_endpoint_slice(NS).items) == 1
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        resource_version=api.resource_version,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    address = api.port

    api.set_down(True)
    assert api.is_down
    collector.finish()
    assert isinstance(collector.error, urllib3.exceptions.ProtocolError)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as refused:
        discovery.list_namespaced_endpoint_slice(NS)
    assert isinstance(refused.value.reason, urllib3.exceptions.NewConnectionError)
    assert "Connection refused" in str(refused.value.reason)
    requests_while_down = api.count()

    put_slice(api, "users-b", "users", "10.0.0.2")  # state changes while down are kept
    api.set_down(False)
    assert api.port == address
    assert len(discovery.list_namespaced_endpoint_slice(NS).items) == 2
    assert api.count() == requests_while_down + 1


def test_unknown_paths_and_discovery(api: FakeApiServer) -> None:
    status, _, body = raw_get(api, "/apis/apps/v1/namespaces/x/deployments")
    assert status == 404 and json.loads(body)["kind"] == "Status"
    status, _, body = raw_get(api, "/apis")
    assert status == 200 and json.loads(body)["groups"][0]["name"] == "discovery.k8s.io"
    status, _, body = raw_get(api, "/api")
    assert status == 200 and json.loads(body)["versions"] == ["v1"]
    assert api.count(verb="discovery") == 2 and api.count(verb="other") == 1


def test_watch_headers_arrive_before_any_event_and_a_closed_client_is_unregistered(
    api: FakeApiServer,
) -> None:
    conn = http.client.HTTPConnection(api.host, api.port, timeout=WAIT)
    path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?watch=true"
    conn.request("GET", path, headers={"Authorization": f"Bearer {api.token}"})
    resp = conn.getresponse()  # no event yet: the 200 and its headers are flushed at once
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    assert api.wait_for_watches(1)
    put_slice(api, "users-a", "users", "10.0.0.1")
    event = json.loads(resp.readline())
    assert event["type"] == "ADDED" and event["object"]["kind"] == "EndpointSlice"
    conn.close()
    assert wait_until(lambda: api.active_watches == 0)


def test_client_side_watch_stop_unregisters_the_watch(
    api: FakeApiServer, discovery: client.DiscoveryV1Api
) -> None:
    collector = WatchCollector(
        discovery.list_namespaced_endpoint_slice,
        NS,
        resource_version=api.resource_version,
        timeout_seconds=30,
    )
    assert api.wait_for_watches(1)
    # stop() only interrupts a read once the client holds the response (Watch._resp); before
    # that it just sets a flag checked after the next event. So repeat it until the stream ends.
    assert wait_until(lambda: collector.watch.stop() or collector.done.wait(0.05))
    assert wait_until(lambda: api.active_watches == 0)


# ---------------------------------------------------------------------------------------------
# writes: ConfigMaps


def configmap(name: str, data: dict[str, str], rv: str | None = None) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, resource_version=rv), data=data)


def test_configmap_create_answers_201_with_the_stored_object_and_refuses_a_second_one(
    api: FakeApiServer, core: client.CoreV1Api
) -> None:
    created: Any = core.create_namespaced_config_map(NS, configmap("state", {"epoch": "1"}))
    assert created.kind == "ConfigMap" and created.data == {"epoch": "1"}
    assert created.metadata.namespace == NS and created.metadata.uid
    assert created.metadata.resource_version == api.resource_version
    assert created.metadata.creation_timestamp is not None
    stored = api.get_object("configmaps", NS, "state")
    assert stored is not None and stored["metadata"]["uid"] == created.metadata.uid
    assert api.requests()[-1].verb == "create" and api.requests()[-1].method == "POST"

    with pytest.raises(ApiException) as again:
        core.create_namespaced_config_map(NS, configmap("state", {"epoch": "2"}))
    assert again.value.status == 409
    status = status_of(again.value)
    assert status["reason"] == "AlreadyExists" and status["message"] == 'configmaps "state" already exists'
    assert status["details"] == {"name": "state", "kind": "configmaps"}
    assert api.resource_version == created.metadata.resource_version  # nothing written


def test_configmap_replace_is_a_compare_and_swap_on_the_resource_version(
    api: FakeApiServer, core: client.CoreV1Api
) -> None:
    created: Any = core.create_namespaced_config_map(NS, configmap("state", {"epoch": "1"}))
    rv = created.metadata.resource_version
    replaced: Any = core.replace_namespaced_config_map("state", NS, configmap("state", {"epoch": "2"}, rv))
    assert replaced.data == {"epoch": "2"} and int(replaced.metadata.resource_version) == int(rv) + 1
    assert replaced.metadata.uid == created.metadata.uid
    assert replaced.metadata.creation_timestamp == created.metadata.creation_timestamp

    with pytest.raises(ApiException) as stale:  # the version it read is gone
        core.replace_namespaced_config_map("state", NS, configmap("state", {"epoch": "3"}, rv))
    assert stale.value.status == 409
    status = status_of(stale.value)
    assert status["reason"] == "Conflict"
    assert status["message"] == (
        'Operation cannot be fulfilled on configmaps "state": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert OPTIMISTIC_LOCK_MESSAGE in status["message"]
    got: Any = core.read_namespaced_config_map("state", NS)
    assert got.data == {"epoch": "2"}

    # Without a resourceVersion a ConfigMap is replaced unconditionally (AllowUnconditionalUpdate).
    forced: Any = core.replace_namespaced_config_map("state", NS, configmap("state", {"epoch": "4"}))
    assert forced.data == {"epoch": "4"} and forced.metadata.resource_version == api.resource_version

    # The same content again: no new version, as etcd's store skips an identical write.
    same: Any = core.replace_namespaced_config_map("state", NS, configmap("state", {"epoch": "4"}))
    assert same.metadata.resource_version == forced.metadata.resource_version

    with pytest.raises(ApiException) as absent:  # no create-on-update for ConfigMaps
        core.replace_namespaced_config_map("nope", NS, configmap("nope", {}))
    assert absent.value.status == 404
    assert status_of(absent.value)["message"] == 'configmaps "nope" not found'


def test_configmap_merge_patch_with_and_without_a_resource_version_precondition(
    api: FakeApiServer, core: client.CoreV1Api
) -> None:
    created: Any = core.create_namespaced_config_map(NS, configmap("state", {"a": "1", "b": "2"}))
    merge = "application/merge-patch+json"
    patched: Any = core.patch_namespaced_config_map(
        "state",
        NS,
        {"data": {"b": None, "c": "3"}, "metadata": {"labels": {"role": "state"}}},
        _content_type=merge,
    )
    assert patched.data == {"a": "1", "c": "3"} and patched.metadata.labels == {"role": "state"}
    assert int(patched.metadata.resource_version) == int(created.metadata.resource_version) + 1
    assert api.requests()[-1].verb == "patch"

    precondition = {"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"d": "4"}}
    with pytest.raises(ApiException) as stale:
        core.patch_namespaced_config_map("state", NS, precondition, _content_type=merge)
    assert stale.value.status == 409 and status_of(stale.value)["reason"] == "Conflict"

    current = {"metadata": {"resourceVersion": patched.metadata.resource_version}, "data": {"d": "4"}}
    cas: Any = core.patch_namespaced_config_map("state", NS, current, _content_type=merge)
    assert cas.data == {"a": "1", "c": "3", "d": "4"}

    # A dict body without _content_type goes as a strategic merge patch: the same, for a map.
    default: Any = core.patch_namespaced_config_map("state", NS, {"data": {"a": None}})
    assert default.data == {"c": "3", "d": "4"}
    assert (api.get_object("configmaps", NS, "state") or {})["data"] == {"c": "3", "d": "4"}

    with pytest.raises(ApiException) as absent:
        core.patch_namespaced_config_map("nope", NS, {"data": {}}, _content_type=merge)
    assert absent.value.status == 404


def test_configmap_delete_honours_delete_options_preconditions(
    api: FakeApiServer, core: client.CoreV1Api
) -> None:
    created: Any = core.create_namespaced_config_map(NS, configmap("state", {"a": "1"}))
    rv, uid = created.metadata.resource_version, created.metadata.uid
    api.put_configmap(NS, "state", {"a": "2"})  # someone else wrote since

    stale = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=rv))
    with pytest.raises(ApiException) as conflict:
        core.delete_namespaced_config_map("state", NS, body=stale)
    assert conflict.value.status == 409
    assert status_of(conflict.value)["message"] == (
        f'Operation cannot be fulfilled on configmaps "state": Precondition failed: '
        f"ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {api.resource_version}"
    )
    wrong_uid = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="not-the-uid"))
    with pytest.raises(ApiException) as uid_conflict:
        core.delete_namespaced_config_map("state", NS, body=wrong_uid)
    assert uid_conflict.value.status == 409 and "UID in precondition: not-the-uid" in str(
        uid_conflict.value.body
    )
    assert api.get_object("configmaps", NS, "state") is not None

    current = client.V1DeleteOptions(
        preconditions=client.V1Preconditions(resource_version=api.resource_version, uid=uid)
    )
    deleted: Any = core.delete_namespaced_config_map("state", NS, body=current)
    # The client (37) types a delete's answer as `object`: the Status comes back as a dict.
    assert deleted == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "state", "kind": "configmaps", "uid": uid},
    }
    assert api.get_object("configmaps", NS, "state") is None
    assert api.requests()[-1].verb == "delete"
    with pytest.raises(ApiException) as gone:
        core.delete_namespaced_config_map("state", NS)
    assert gone.value.status == 404

    api.put_configmap(NS, "plain", {})
    plain: Any = core.delete_namespaced_config_map("plain", NS)  # no body at all
    assert plain["status"] == "Success"


def test_every_write_through_the_api_is_a_watch_event_with_its_version(
    api: FakeApiServer, core: client.CoreV1Api
) -> None:
    collector = WatchCollector(
        core.list_namespaced_config_map, NS, resource_version=api.resource_version, timeout_seconds=30
    )
    assert api.wait_for_watches(1)
    created: Any = core.create_namespaced_config_map(NS, configmap("state", {"v": "1"}))
    replaced: Any = core.replace_namespaced_config_map(
        "state", NS, configmap("state", {"v": "2"}, created.metadata.resource_version)
    )
    core.replace_namespaced_config_map("state", NS, configmap("state", {"v": "2"}))  # no change: no event
    patched: Any = core.patch_namespaced_config_map("state", NS, {"data": {"v": "3"}})
    core.delete_namespaced_config_map("state", NS)
    events = collector.wait_events(4)
    assert collector.names() == [
        ("ADDED", "state"),
        ("MODIFIED", "state"),
        ("MODIFIED", "state"),
        ("DELETED", "state"),
    ]
    versions = [e["raw_object"]["metadata"]["resourceVersion"] for e in events]
    assert versions[:3] == [
        created.metadata.resource_version,
        replaced.metadata.resource_version,
        patched.metadata.resource_version,
    ]
    assert versions[3] == api.resource_version
    assert [e["raw_object"]["data"] for e in events] == [{"v": "1"}, {"v": "2"}, {"v": "3"}, {"v": "3"}]
    api.drop_watches()
    collector.finish()


def test_bodies_the_server_refuses(api: FakeApiServer) -> None:
    base = f"/api/v1/namespaces/{NS}/configmaps"
    status, answer = raw_request(api, "POST", base, {"data": {"a": "1"}})
    assert status == 422 and answer["reason"] == "Invalid"
    assert (
        answer["message"]
        == 'ConfigMap "" is invalid: metadata.name: Required value: name or generateName is required'
    )
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "x", "namespace": "elsewhere"}})
    assert status == 400 and answer["message"] == (
        "the namespace of the provided object does not match the namespace sent on the request"
    )
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "Not_A_Name"}})
    assert status == 422 and "a lowercase RFC 1123 subdomain" in answer["message"]
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "x", "resourceVersion": "5"}})
    assert status == 500 and "resourceVersion should not be set on objects to be created" in answer["message"]
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "x"}, "data": {"n": 1}})
    assert status == 400 and answer["message"].startswith('ConfigMap in version "v1" cannot be handled')
    status, answer = raw_request(api, "POST", base, {"kind": "Secret", "metadata": {"name": "x"}})
    assert status == 400 and "does not match the expected kind" in answer["message"]
    status, answer = raw_request(api, "POST", base, b"{not json")
    assert status == 400
    status, answer = raw_request(api, "POST", base, b"metadata: {name: x}", content_type="application/yaml")
    assert status == 415 and answer["reason"] == "UnsupportedMediaType"
    status, answer = raw_request(api, "POST", "/api/v1/configmaps", {"metadata": {"name": "x"}})
    assert status == 405  # the all-namespaces collection is read-only
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "x"}}, content_type=None)
    assert status == 201  # no Content-Type: JSON, the server's first serializer

    status, generated = raw_request(api, "POST", base, {"metadata": {"generateName": "state-"}})
    assert status == 201 and generated["metadata"]["name"].startswith("state-")
    assert len(generated["metadata"]["name"]) == len("state-") + 5

    status, answer = raw_request(api, "PUT", f"{base}/x", {"metadata": {"name": "y"}})
    assert (
        status == 400
        and answer["message"] == "the name of the object (y) does not match the name on the URL (x)"
    )
    status, answer = raw_request(api, "PUT", f"{base}/x", {"metadata": {"name": "x", "uid": "other"}})
    assert status == 409 and "Precondition failed: UID in precondition: other" in answer["message"]
    status, answer = raw_request(
        api,
        "PATCH",
        f"{base}/x",
        [{"op": "add", "path": "/data", "value": {}}],
        "application/json-patch+json",
    )
    assert status == 415
    status, answer = raw_request(
        api, "PATCH", f"{base}/x", {"data": {"$patch": "replace"}}, "application/strategic-merge-patch+json"
    )
    assert status == 400 and "$patch" in answer["message"]
    status, answer = raw_request(api, "POST", base, {"metadata": {"name": "y"}}, token="not-a-token")
    assert status == 401
    status, answer = raw_request(api, "POST", f"{base}?dryRun=All", {"metadata": {"name": "y"}})
    assert status == 400
    assert api.get_object("configmaps", NS, "y") is None


def test_merge_patch_is_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "l": [3], "n": {"x": None, "y": 1}}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "l": [3], "n": {"y": 1}}
    assert target == {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}  # not modified
    assert merge_patch({"a": 1}, ["x"]) == ["x"]
    assert merge_patch("text", {"a": 1}) == {"a": 1}


def test_endpointslices_take_the_same_writes(api: FakeApiServer, discovery: client.DiscoveryV1Api) -> None:
    body = client.V1EndpointSlice(
        address_type="IPv4",
        metadata=client.V1ObjectMeta(name="users-w", labels={SERVICE_NAME_LABEL: "users"}),
        endpoints=[client.V1Endpoint(addresses=["10.0.0.9"])],
    )
    created: Any = discovery.create_namespaced_endpoint_slice(NS, body)
    assert created.metadata.resource_version == api.resource_version
    listed: Any = discovery.list_namespaced_endpoint_slice(NS, label_selector=selector("users"))
    assert [item.metadata.name for item in listed.items] == ["users-w"]
    with pytest.raises(ApiException) as missing:
        discovery.read_namespaced_endpoint_slice("nope", NS)
    assert status_of(missing.value)["message"] == 'endpointslices.discovery.k8s.io "nope" not found'
    assert status_of(missing.value)["details"] == {
        "name": "nope",
        "group": "discovery.k8s.io",
        "kind": "endpointslices",
    }


# ---------------------------------------------------------------------------------------------
# Leases


RENEWED = "2026-12-02T03:04:05.123456Z"


def lease(name: str, holder: str, rv: str | None = None, renew: datetime | None = None) -> client.V1Lease:
    when = renew or datetime(2026, 12, 2, 3, 4, 5, 123456, tzinfo=UTC)
    return client.V1Lease(
        metadata=client.V1ObjectMeta(name=name, resource_version=rv, labels={"app": "shardgate"}),
        spec=client.V1LeaseSpec(
            holder_identity=holder,
            lease_duration_seconds=15,
            acquire_time=when,
            renew_time=when,
            lease_transitions=0,
        ),
    )


def test_lease_create_read_list_and_replace_through_coordination_v1(
    api: FakeApiServer, coordination: client.CoordinationV1Api
) -> None:
    created: Any = coordination.create_namespaced_lease(NS, lease("leader", "replica-a"))
    assert created.kind == "Lease" and created.api_version == "coordination.k8s.io/v1"
    assert created.spec.holder_identity == "replica-a"
    assert created.spec.renew_time == datetime(2026, 12, 2, 3, 4, 5, 123456, tzinfo=UTC)
    stored = api.get_object("leases", NS, "leader")
    assert stored is not None
    # The client sent isoformat() (+00:00); the server holds and renders it as a MicroTime.
    assert stored["spec"]["renewTime"] == RENEWED and stored["spec"]["acquireTime"] == RENEWED
    assert api.requests()[-1].resource == "leases" and api.requests()[-1].verb == "create"

    got: Any = coordination.read_namespaced_lease("leader", NS)
    assert got.metadata.resource_version == created.metadata.resource_version
    coordination.create_namespaced_lease(NS, lease("replica-b", "replica-b"))
    listed: Any = coordination.list_namespaced_lease(NS, label_selector="app=shardgate")
    assert listed.kind == "LeaseList" and [i.metadata.name for i in listed.items] == ["leader", "replica-b"]
    by_name: Any = coordination.list_namespaced_lease(NS, field_selector="metadata.name=leader")
    assert [i.metadata.name for i in by_name.items] == ["leader"]

    got.spec.holder_identity = "replica-b"
    got.spec.lease_transitions = 1
    replaced: Any = coordination.replace_namespaced_lease("leader", NS, got)
    assert replaced.spec.holder_identity == "replica-b" and replaced.spec.lease_transitions == 1
    assert int(replaced.metadata.resource_version) == int(got.metadata.resource_version) + 2

    with pytest.raises(ApiException) as stale:  # `got` still carries the version it read
        coordination.replace_namespaced_lease("leader", NS, got)
    assert stale.value.status == 409
    assert status_of(stale.value)["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "leader": ' + OPTIMISTIC_LOCK_MESSAGE
    )
    assert status_of(stale.value)["details"] == {
        "name": "leader",
        "group": "coordination.k8s.io",
        "kind": "leases",
    }

    # The Lease strategy allows no unconditional update: a replace must carry a resourceVersion.
    with pytest.raises(ApiException) as unconditional:
        coordination.replace_namespaced_lease("leader", NS, lease("leader", "replica-c"))
    assert unconditional.value.status == 422
    assert status_of(unconditional.value)["message"] == (
        'leases.coordination.k8s.io "leader" is invalid: metadata.resourceVersion: '
        "Invalid value: 0x0: must be specified for an update"
    )
    assert (api.get_object("leases", NS, "leader") or {})["spec"]["holderIdentity"] == "replica-b"


def test_lease_put_of_an_absent_lease_creates_it_and_patch_and_delete_work(
    api: FakeApiServer, coordination: client.CoordinationV1Api
) -> None:
    # The Lease strategy allows create-on-update: 201, whatever resourceVersion the body names.
    created: Any = coordination.replace_namespaced_lease(
        "replica-a", NS, lease("replica-a", "replica-a", "7")
    )
    assert created.metadata.resource_version == api.resource_version
    assert api.requests()[-1].verb == "update"
    status, _ = raw_request(
        api,
        "PUT",
        f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/replica-z",
        {"metadata": {"name": "replica-z"}, "spec": {"holderIdentity": "replica-z"}},
    )
    assert status == 201

    renewed = "2026-12-02T03:04:06.000001Z"
    patch = {
        "metadata": {"resourceVersion": created.metadata.resource_version},
        "spec": {"renewTime": renewed},
    }
    patched: Any = coordination.patch_namespaced_lease(
        "replica-a", NS, patch, _content_type="application/merge-patch+json"
    )
    assert patched.spec.renew_time == datetime(2026, 12, 2, 3, 4, 6, 1, tzinfo=UTC)
    assert patched.spec.holder_identity == "replica-a"  # the rest of the spec is kept
    with pytest.raises(ApiException) as stale:
        coordination.patch_namespaced_lease(
            "replica-a", NS, patch, _content_type="application/merge-patch+json"
        )
    assert stale.value.status == 409

    deleted: Any = coordination.delete_namespaced_lease("replica-a", NS)
    assert deleted["status"] == "Success" and deleted["details"]["group"] == "coordination.k8s.io"
    with pytest.raises(ApiException) as gone:
        coordination.read_namespaced_lease("replica-a", NS)
    assert gone.value.status == 404
    assert status_of(gone.value)["message"] == 'leases.coordination.k8s.io "replica-a" not found'


def test_micro_times_are_what_the_real_server_decodes(
    api: FakeApiServer, coordination: client.CoordinationV1Api
) -> None:
    assert micro_time(RENEWED) == RENEWED
    assert micro_time("2026-12-02T05:04:05.123456+02:00") == RENEWED
    for bad in ("2026-12-02T03:04:05.123Z", "2026-12-02T03:04:05Z", "2026-12-02T03:04:05.123456", 5):
        with pytest.raises(ValueError):
            micro_time(bad)

    stored = api.put_lease(NS, "replica-a", {"holderIdentity": "replica-a", "renewTime": RENEWED}, {"k": "v"})
    assert stored["spec"] == {"holderIdentity": "replica-a", "renewTime": RENEWED}
    assert stored["metadata"]["labels"] == {"k": "v"}
    assert api.get_object("leases", NS, "replica-a") == stored
    assert (
        api.put_lease(NS, "replica-a", {"holderIdentity": "replica-a", "renewTime": RENEWED}, {"k": "v"})
        == stored
    )
    with pytest.raises(ValueError):
        api.put_lease(NS, "replica-a", {"renewTime": "2026-12-02T03:04:05Z"})

    # Python's isoformat() drops a zero microsecond: the real server cannot decode that.
    whole_second = datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(ApiException) as undecodable:
        coordination.create_namespaced_lease(NS, lease("leader", "replica-a", renew=whole_second))
    assert undecodable.value.status == 400
    assert status_of(undecodable.value)["message"].startswith(
        'Lease in version "v1" cannot be handled as a Lease: parsing time "2026-12-02T03:04:05+00:00"'
    )
    path = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
    status, answer = raw_request(
        api, "POST", path, {"metadata": {"name": "x"}, "spec": {"leaseDurationSeconds": 0}}
    )
    assert status == 422
    assert answer["message"] == (
        'Lease.coordination.k8s.io "x" is invalid: spec.leaseDurationSeconds: '
        "Invalid value: 0: must be greater than 0"
    )


def test_lease_watch_sees_the_python_side_and_the_api_side_writes(
    api: FakeApiServer, coordination: client.CoordinationV1Api
) -> None:
    collector = WatchCollector(
        coordination.list_namespaced_lease, NS, resource_version=api.resource_version, timeout_seconds=30
    )
    assert api.wait_for_watches(1, resource="leases")
    api.put_lease(NS, "leader", {"holderIdentity": "replica-a", "renewTime": RENEWED})
    current: Any = coordination.read_namespaced_lease("leader", NS)
    current.spec.holder_identity = "replica-b"
    coordination.replace_namespaced_lease("leader", NS, current)
    api.delete_lease(NS, "leader")
    events = collector.wait_events(3)
    assert collector.names() == [("ADDED", "leader"), ("MODIFIED", "leader"), ("DELETED", "leader")]
    assert isinstance(events[1]["object"], client.V1Lease)
    assert events[1]["raw_object"]["spec"]["holderIdentity"] == "replica-b"
    api.drop_watches()
    collector.finish()


def race_replace(replicas: dict[str, client.CoordinationV1Api], bodies: dict[str, Any]) -> dict[str, int]:
    """Every replica replaces the "leader" Lease with its body at once; token -> HTTP status."""
    start = threading.Barrier(len(replicas))
    outcome: dict[str, int] = {}

    def replace(token: str) -> None:
        start.wait(WAIT)
        try:
            replicas[token].replace_namespaced_lease("leader", NS, bodies[token])
            outcome[token] = 200
        except ApiException as exc:
            outcome[token] = exc.status

    threads = [threading.Thread(target=replace, args=(token,)) for token in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    return outcome


def test_two_clients_racing_a_lease_compare_and_swap_exactly_one_wins(
    api: FakeApiServer, client_for: Callable[[str], client.ApiClient]
) -> None:
    api.put_lease(NS, "leader", {"holderIdentity": "", "leaseDurationSeconds": 15})
    replicas = {token: client.CoordinationV1Api(client_for(token)) for token in ("replica-a", "replica-b")}
    for round_number in range(5):
        seen: dict[str, Any] = {
            token: leases.read_namespaced_lease("leader", NS) for token, leases in replicas.items()
        }
        assert len({s.metadata.resource_version for s in seen.values()}) == 1
        for token, read in seen.items():  # each takes the lease over from what it read
            read.spec.holder_identity = token
            read.spec.lease_transitions = round_number + 1
        outcome = race_replace(replicas, seen)
        assert sorted(outcome.values()) == [200, 409], outcome
        winner = next(t for t, code in outcome.items() if code == 200)
        stored = api.get_object("leases", NS, "leader")
        assert stored is not None and stored["spec"]["holderIdentity"] == winner
        before = int(next(iter(seen.values())).metadata.resource_version)
        assert int(stored["metadata"]["resourceVersion"]) == before + 1  # one write, not two
    assert {r.client for r in api.requests() if r.verb == "update"} == set(replicas)


def test_discovery_lists_both_groups(api: FakeApiServer) -> None:
    status, _, body = raw_get(api, "/apis")
    groups = json.loads(body)["groups"]
    assert status == 200 and [g["name"] for g in groups] == ["discovery.k8s.io", "coordination.k8s.io"]
    assert groups[1]["preferredVersion"] == {"groupVersion": "coordination.k8s.io/v1", "version": "v1"}
    status, _, body = raw_get(api, "/apis/coordination.k8s.io")
    assert (
        status == 200
        and json.loads(body)["kind"] == "APIGroup"
        and json.loads(body)["name"] == "coordination.k8s.io"
    )
    status, _, body = raw_get(api, "/apis/coordination.k8s.io/v1")
    resources = json.loads(body)["resources"]
    assert status == 200 and [r["name"] for r in resources] == ["leases"]
    assert {"create", "update", "patch", "delete", "watch"} <= set(resources[0]["verbs"])
    status, _, body = raw_get(api, "/apis/discovery.k8s.io/v1")
    assert [r["kind"] for r in json.loads(body)["resources"]] == ["EndpointSlice"]
    assert api.count(verb="discovery") == 4


# ---------------------------------------------------------------------------------------------
# clients: tokens, watch delays, cut-offs


def test_each_kubeconfig_token_is_a_client_of_its_own(
    api: FakeApiServer, client_for: Callable[[str], client.ApiClient], tmp_path: Path
) -> None:
    a = client.CoreV1Api(client_for("replica-a"))
    b = client.CoreV1Api(client_for("replica-b"))
    a.list_namespaced_config_map(NS)
    b.list_namespaced_config_map(NS)
    b.read_namespaced_config_map("missing", NS) if False else None
    assert [r.client for r in api.requests()] == ["replica-a", "replica-b"]
    assert api.requests()[0].authorization == "Bearer replica-a"
    assert api.count(verb="list", client="replica-b") == 1

    refused = api.kubeconfig(tmp_path / "refused" / "kubeconfig", token="never-added")
    with client.ApiClient(kube_configuration(refused)) as stranger:
        with pytest.raises(ApiException) as unauthorized:
            client.CoreV1Api(stranger).list_namespaced_config_map(NS)
    assert unauthorized.value.status == 401
    assert api.requests()[-1].client == "never-added"
    with FakeApiServer(tokens=["given"]) as other:
        status, _ = raw_request(other, "GET", f"/api/v1/namespaces/{NS}/configmaps", token="given")
        assert status == 200


def test_a_watch_delay_holds_back_that_clients_events_only(
    api: FakeApiServer, client_for: Callable[[str], client.ApiClient]
) -> None:
    slow = client.CoreV1Api(client_for("slow"))
    fast = client.CoreV1Api(client_for("fast"))
    start = api.resource_version
    slow_watch = WatchCollector(
        slow.list_namespaced_config_map, NS, resource_version=start, timeout_seconds=60
    )
    fast_watch = WatchCollector(
        fast.list_namespaced_config_map, NS, resource_version=start, timeout_seconds=60
    )
    assert api.wait_for_watches(1, client="slow") and api.wait_for_watches(1, client="fast")
    api.set_watch_delay("slow", 60)  # applies to the watch already open
    assert api.watch_delay("slow") == 60

    for i in range(3):
        api.put_configmap(NS, "state", {"i": str(i)})
    fast_watch.wait_events(3)
    assert [e["raw_object"]["data"]["i"] for e in fast_watch.events] == ["0", "1", "2"]
    assert slow_watch.events == []  # due a minute after they happened
    # Reads are not delayed: the slow client lists and gets the latest state at once.
    listed: Any = slow.list_namespaced_config_map(NS)
    assert listed.metadata.resource_version == api.resource_version
    assert [c.data for c in listed.items] == [{"i": "2"}]
    got: Any = slow.read_namespaced_config_map("state", NS)
    assert got.data == {"i": "2"}

    api.set_watch_delay("slow", 0)  # clears it: what was held back comes now, in order
    slow_watch.wait_events(3)
    assert slow_watch.names() == [("ADDED", "state"), ("MODIFIED", "state"), ("MODIFIED", "state")]
    assert [e["raw_object"]["data"]["i"] for e in slow_watch.events] == ["0", "1", "2"]
    api.drop_watches()
    slow_watch.finish()
    fast_watch.finish()


def test_a_delayed_watch_gets_every_event_and_bookmark_no_sooner_than_its_delay_in_order(
    api: FakeApiServer, client_for: Callable[[str], client.ApiClient]
) -> None:
    delay = 0.4
    api.set_watch_delay("slow", delay)  # set before the watch opens: it applies to new ones
    slow = client.CoreV1Api(client_for("slow"))
    collector = WatchCollector(
        slow.list_namespaced_config_map,
        NS,
        resource_version=api.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=60,
    )
    assert api.wait_for_watches(1, client="slow")
    start = api.resource_version
    happened: list[float] = []
    for i in range(2):
        happened.append(time.monotonic())  # no later than the change itself
        api.put_configmap(NS, "state", {"i": str(i)})
    happened.append(time.monotonic())
    assert api.send_bookmark() == 1
    happened.append(time.monotonic())
    api.delete_configmap(NS, "state")
    collector.wait_events(4)
    assert collector.types() == ["ADDED", "MODIFIED", "BOOKMARK", "DELETED"]
    for arrived, at in zip(collector.times, happened, strict=True):
        assert arrived >= at + delay
    assert collector.events[2]["raw_object"]["metadata"]["resourceVersion"] == str(
        int(api.resource_version) - 1
    )

    # A watch opened later from an old version gets the history replayed on the same schedule
    # (each event its delay after it happened): all of it, in order.
    replay = WatchCollector(slow.list_namespaced_config_map, NS, resource_version=start, timeout_seconds=60)
    replay.wait_events(3)
    assert replay.types() == ["ADDED", "MODIFIED", "DELETED"]
    for arrived, at in zip(replay.times, [happened[0], happened[1], happened[3]], strict=True):
        assert arrived >= at + delay
    api.drop_watches()
    collector.finish()
    replay.finish()


def test_cut_off_partitions_one_client_until_it_is_healed(
    api: FakeApiServer, client_for: Callable[[str], client.ApiClient]
) -> None:
    a = client.CoreV1Api(client_for("replica-a"))
    b = client.CoreV1Api(client_for("replica-b"))
    a_watch = WatchCollector(
        a.list_namespaced_config_map, NS, resource_version=api.resource_version, timeout_seconds=60
    )
    b_watch = WatchCollector(
        b.list_namespaced_config_map, NS, resource_version=api.resource_version, timeout_seconds=60
    )
    assert api.wait_for_watches(1, client="replica-a") and api.wait_for_watches(1, client="replica-b")

    assert api.cut_off("replica-a") == 1
    assert api.is_cut_off("replica-a") and not api.is_cut_off("replica-b")
    a_watch.finish()
    assert isinstance(a_watch.error, urllib3.exceptions.ProtocolError)  # no clean end
    requests_before = api.count(client="replica-a")
    with pytest.raises((urllib3.exceptions.ProtocolError, urllib3.exceptions.MaxRetryError)) as refused:
        a.list_namespaced_config_map(NS)
    assert not isinstance(refused.value, ApiException)
    with pytest.raises(urllib3.exceptions.ProtocolError):  # POST: not retried
        a.create_namespaced_config_map(NS, configmap("state", {"by": "a"}))
    refused_watch = WatchCollector(a.list_namespaced_config_map, NS, timeout_seconds=5)
    refused_watch.finish()
    assert isinstance(refused_watch.error, urllib3.exceptions.MaxRetryError)  # a GET: retried, then this
    assert refused_watch.events == []
    assert api.count(client="replica-a") == requests_before  # never reached the server
    assert api.get_object("configmaps", NS, "state") is None

    # The other client is not affected: its watch stays open, its requests are answered.
    created: Any = b.create_namespaced_config_map(NS, configmap("state", {"by": "b"}))
    assert (
        b_watch.wait_events(1)[0]["raw_object"]["metadata"]["resourceVersion"]
        == created.metadata.resource_version
    )
    assert api.watch_count(client="replica-b") == 1

    assert api.cut_off("replica-a", False) == 0
    listed: Any = a.list_namespaced_config_map(NS)
    assert [c.data for c in listed.items] == [{"by": "b"}]
    again = WatchCollector(
        a.list_namespaced_config_map, NS, resource_version=start_of(listed), timeout_seconds=60
    )
    assert api.wait_for_watches(1, client="replica-a")
    b.replace_namespaced_config_map("state", NS, configmap("state", {"by": "b2"}))
    assert again.wait_events(1)[0]["raw_object"]["data"] == {"by": "b2"}
    api.drop_watches()
    again.finish()
    b_watch.finish()


def start_of(listed: Any) -> str:
    """The resourceVersion a list answered, to watch from."""
    return str(listed.metadata.resource_version)
