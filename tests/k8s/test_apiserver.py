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
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.k8s.apiserver import (
    SERVICE_NAME_LABEL,
    FakeApiServer,
    SelectorError,
    endpoint,
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
