"""Kubernetes config source: the shard-config ConfigMap and the groups' EndpointSlices.

Each watched query runs a list-then-watch loop in a daemon thread with the official client
(as client-go's reflector does): list, watch from the list's resourceVersion with bookmarks,
re-watch after a server-side timeout, re-list on 410 Gone, back off with jitter on errors.
Threads only hand immutable copies of the objects to the event loop; the loop coalesces bursts
of changes into one topology rebuild per ``coalesce`` seconds and never waits on the API server.
While the API server is unreachable, the last known topology stays in force.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader

from gateway.config import ConfigError, ShardConfig
from gateway.discovery.source import ConfigApplier, ConfigStatus
from gateway.fence import ConfigMapSource, StateFollower
from gateway.observability.metrics import Metrics
from gateway.settings import SERVICE_ACCOUNT_DIR
from gateway.shardstate import View, state_configmap_name
from gateway.tasks import log_if_it_fails
from gateway.topology import DiscoveredPod, PodState, TopologyBuilder, TopologyHolder

log = logging.getLogger("shardgate.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
CONFIG_KEY = "shards.yaml"
RawObject = dict[str, Any]


def load_api_client(service_account_dir: str = SERVICE_ACCOUNT_DIR) -> client.ApiClient:
    """In a pod (``KUBERNETES_SERVICE_HOST`` set) the service account's token and CA from
    ``service_account_dir``, else KUBECONFIG / ~/.kube/config, like kubectl."""
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            directory = Path(service_account_dir)
            InClusterConfigLoader(
                token_filename=str(directory / "token"), cert_filename=str(directory / "ca.crt")
            ).load_and_set(configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except ConfigException as exc:
        raise ConfigError([f"kubernetes credentials: {exc}"]) from None
    return client.ApiClient(configuration)


# The two lists the gateway watches (namespaced paths of the API, and the list type the
# generated client gives them: Watch reads it to decode the objects of events).
CONFIGMAPS = ("/api/v1/namespaces/{namespace}/configmaps", "V1ConfigMapList")
ENDPOINT_SLICES = ("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", "V1EndpointSliceList")
WATCHED = (CONFIGMAPS, ENDPOINT_SLICES)  # every API endpoint the gateway reads (its RBAC follows)
_QUERY_NAMES = {
    "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
}


def list_call(api: client.ApiClient, endpoint: tuple[str, str]) -> Callable[..., Any]:
    """A namespaced list (or, with ``watch=True``, watch) call of ``endpoint``: the wire call of
    the generated ``CoreV1Api.list_namespaced_config_map`` and the like, made with the official
    client's own request machinery (``ApiClient.param_serialize`` and ``call_api``: its
    configuration, credentials and connection pool). The generated API classes are not used:
    importing the one that holds ConfigMaps (CoreV1Api: hundreds of validated methods) costs
    ~21 MB of resident memory. Returns the raw response, unread, as the generated calls do with
    ``_preload_content=False``; a status other than 2xx raises ApiException."""
    path, list_type = endpoint

    def call(
        namespace: str, _request_timeout: Any = None, _preload_content: bool = False, **query: Any
    ) -> Any:
        params = [(_QUERY_NAMES[name], value) for name, value in query.items() if value is not None]
        request = api.param_serialize(
            method="GET",
            resource_path=path,
            path_params={"namespace": namespace},
            query_params=params,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request, _request_timeout=_request_timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    # Watch.stream decodes each event's object by the type this docstring names.
    call.__doc__ = f":return: {list_type}"
    call.__name__ = f"list_{list_type}"
    return call


@dataclass
class WatchStatus:
    """One watched query, as /debug/ring and /metrics show it."""

    resource: str
    state: str = "starting"  # listing | watching | backoff | stopped
    up: bool = False  # the last list or watch call reached the API server
    since: float = field(default_factory=time.time)
    last_event_at: float | None = None
    reconnects: int = 0
    relists: int = 0
    last_error: str | None = None

    def set_state(self, state: str) -> None:
        if state != self.state:
            log.info("watch %s: %s -> %s", self.resource, self.state, state)
            self.state = state
            self.since = time.time()

    def describe(self) -> dict[str, object]:
        return {
            "resource": self.resource,
            "state": self.state,
            "up": self.up,
            "since": self.since,
            "last_event_at": self.last_event_at,
            "reconnects": self.reconnects,
            "relists": self.relists,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class WatchTiming:
    watch_timeout: float = 300.0  # server-side timeoutSeconds of one watch call
    connect_timeout: float = 5.0
    list_timeout: float = 30.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0


class ResourceWatcher:
    """List-then-watch loop for one query, in a daemon thread.

    ``on_items`` is called from the thread with a fresh dict name -> raw object after the
    list and after every change; it must not block.
    """

    def __init__(
        self,
        resource: str,
        list_call: Callable[..., Any],
        query: Mapping[str, Any],
        on_items: Callable[[dict[str, RawObject]], None],
        timing: WatchTiming,
    ) -> None:
        self.status = WatchStatus(resource)
        self._list_call = list_call
        self._query = dict(query)
        self._on_items = on_items
        self._timing = timing
        self._stopped = threading.Event()

        # Keeps the list call's signature and docstring: Watch.stream reads its return type there.
        @functools.wraps(list_call)
        def connected_call(*args: Any, **kwargs: Any) -> Any:
            """The list call, noting when the API server accepts the (watch) request."""
            response = list_call(*args, **kwargs)
            if 200 <= getattr(response, "status", 0) < 300:
                self.status.up = True
                self.status.last_error = None
            return response

        self._connected_call = connected_call
        self._watch: watch.Watch | None = None
        self._version: str | None = None  # resourceVersion reached: where a re-watch resumes
        self._thread = threading.Thread(target=self._run, name=f"watch-{resource}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.status.set_state("stopped")
        current = self._watch
        if current is not None:
            current.stop()  # shuts the socket down so a blocked read returns

    def _run(self) -> None:
        items: dict[str, RawObject] = {}
        self._version = None
        failures = 0
        while not self._stopped.is_set():
            try:
                if self._version is None:
                    self.status.set_state("listing")
                    items, self._version = self._list()
                    self._deliver(items)
                self.status.set_state("watching")
                self._watch_from(items, self._version)
                failures = 0
            except ApiException as exc:
                if exc.status == 410:  # our version is too old: the reflector's answer is a re-list
                    self.status.relists += 1
                    self._version = None
                    continue
                failures += 1
                self._failed(f"API server answered {exc.status}: {exc.reason}", failures)
            except Exception as exc:  # connection refused/reset, timeouts, malformed answers
                if self._stopped.is_set():
                    break
                failures += 1
                self._failed(f"{type(exc).__name__}: {exc}", failures)

    def _list(self) -> tuple[dict[str, RawObject], str]:
        timing = self._timing
        response = self._list_call(
            **self._query,
            _preload_content=False,
            _request_timeout=(timing.connect_timeout, timing.list_timeout),
        )
        try:
            document = json.loads(response.data)
        finally:
            response.release_conn()
        self.status.up = True
        self.status.last_error = None
        items = {item["metadata"]["name"]: item for item in document.get("items") or []}
        return items, document["metadata"]["resourceVersion"]

    def _watch_from(self, items: dict[str, RawObject], version: str) -> str:
        """Apply watch events to ``items`` until the stream ends; return the version reached."""
        timing = self._timing
        self._watch = stream_watch = watch.Watch()
        if self._stopped.is_set():
            return version
        # Jitter the server-side timeout so that many replicas do not re-watch in lockstep.
        timeout = int(timing.watch_timeout * random.uniform(0.8, 1.0)) or 1
        events = stream_watch.stream(
            self._connected_call,
            **self._query,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            _request_timeout=(timing.connect_timeout, timeout + 30),
        )
        for event in events:
            if self._stopped.is_set():
                break
            self.status.up = True
            self.status.last_event_at = time.time()
            kind = event["type"]
            obj = event["raw_object"]
            version = obj.get("metadata", {}).get("resourceVersion") or version
            self._version = version  # survives a stream that breaks after this event
            if kind == "BOOKMARK":
                continue
            name = obj["metadata"]["name"]
            if kind == "DELETED":
                items.pop(name, None)
            else:
                items[name] = obj
            self._deliver(items)
        return version

    def _deliver(self, items: dict[str, RawObject]) -> None:
        if not self._stopped.is_set():
            self._on_items(dict(items))

    def _failed(self, reason: str, failures: int) -> None:
        status = self.status
        status.up = False
        status.last_error = reason
        status.reconnects += 1
        status.set_state("backoff")
        timing = self._timing
        ceiling = min(timing.backoff_max, timing.backoff_initial * 2 ** (failures - 1))
        delay = random.uniform(ceiling / 2, ceiling)  # "equal jitter": spread, but never zero
        log.warning("watch %s failed (%s); retrying in %.1fs", status.resource, reason, delay)
        self._stopped.wait(delay)


def pod_state(conditions: Mapping[str, Any] | None) -> PodState:
    """EndpointConditions as the API documents them: nil ready means true, nil terminating false."""
    conditions = conditions or {}
    if conditions.get("terminating"):
        return PodState.TERMINATING
    ready = conditions.get("ready")
    return PodState.READY if ready is None or ready else PodState.NOT_READY


_STATE_RANK = {PodState.READY: 2, PodState.TERMINATING: 1, PodState.NOT_READY: 0}


def slice_port(ports: Iterable[Mapping[str, Any]] | None, wanted: int | str | None) -> int | None:
    """The slice's port number for the group's ``port:`` (a name or a number; unset = the only one)."""
    ports = list(ports or ())
    if wanted is None:
        return ports[0].get("port") if len(ports) == 1 else None
    for port in ports:
        if (port.get("name") == wanted) if isinstance(wanted, str) else (port.get("port") == wanted):
            return port.get("port")
    return None


def pods_by_group(config: ShardConfig, slices: Mapping[str, RawObject]) -> dict[str, list[DiscoveredPod]]:
    """Merge the EndpointSlices of each group's Service into one pod list per group.

    An endpoint reported by two slices (as during slice rebalancing) counts once, in the most
    available of its states.
    """
    by_service: dict[str, list[RawObject]] = {}
    for item in slices.values():
        service = (item.get("metadata", {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if service:
            by_service.setdefault(service, []).append(item)
    result: dict[str, list[DiscoveredPod]] = {}
    for group in config.groups:
        if group.service is None:
            continue
        found: dict[tuple[str, int], DiscoveredPod] = {}
        for item in by_service.get(group.service, ()):
            port = slice_port(item.get("ports"), group.port)
            if port is None:
                continue
            for endpoint in item.get("endpoints") or ():
                addresses = endpoint.get("addresses") or ()
                if not addresses:
                    continue
                host = addresses[0]  # the addresses of one endpoint are fungible, by the API
                state = pod_state(endpoint.get("conditions"))
                target = endpoint.get("targetRef") or {}
                previous = found.get((host, port))
                if previous is None or _STATE_RANK[state] > _STATE_RANK[previous.state]:
                    found[(host, port)] = DiscoveredPod(host, port, state, target.get("name"))
        result[group.name] = list(found.values())
    return result


class KubernetesSource:
    """Watches the ConfigMap and the configured groups' EndpointSlices; swaps topologies."""

    def __init__(
        self,
        configmap: str,
        namespace: str,
        builder: TopologyBuilder,
        holder: TopologyHolder,
        metrics: Metrics,
        api_factory: Callable[[], client.ApiClient] = load_api_client,
        timing: WatchTiming | None = None,
        coalesce: float = 0.1,
        sync_timeout: float = 5.0,
        follow_state: bool = False,
        on_desired: Callable[[], None] | None = None,
    ) -> None:
        """``follow_state``: route on the shard state (ConfigMap ``NAME-state``, written by the
        hand-off's leader) and hand the desired config (``NAME``), once validated, to
        ``on_desired`` (``desired_text``); otherwise apply the desired config itself."""
        self.configmap = configmap
        self.namespace = namespace
        self._applier = ConfigApplier(f"configmap:{namespace}/{configmap}", builder, holder, metrics)
        self._metrics = metrics
        self._api_factory = api_factory
        self._timing = timing or WatchTiming()
        self._coalesce = coalesce
        self._sync_timeout = sync_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._configmap_watcher: ResourceWatcher | None = None
        self._slice_watcher: ResourceWatcher | None = None
        self._slice_services: tuple[str, ...] = ()
        self._slice_generation: object = None
        self._slices: dict[str, RawObject] = {}
        self._slices_synced = False
        self.desired_text: str | None = None  # the last valid desired config (state mode)
        self._on_desired = on_desired
        self._follower: StateFollower | None = None
        self._follower_start: asyncio.Task[None] | None = None
        self._state_source: ConfigMapSource | None = None
        if follow_state:
            source = ConfigMapSource(
                state_configmap_name(configmap), namespace, api_factory, None, self._timing
            )
            self._state_source = source
            self._follower = StateFollower(source, "gateway")
            self._follower.subscribe(self._view_changed)
        # valid, waiting for its Services' first list (with the shard state it comes from)
        self._pending: tuple[ShardConfig, View | None] | None = None
        self._pending_deadline: asyncio.TimerHandle | None = None
        self._rebuild_handle: asyncio.TimerHandle | None = None

    @property
    def status(self) -> ConfigStatus:
        return self._applier.status

    @property
    def rebuilds(self) -> int:
        return self._applier.swaps

    @property
    def follower(self) -> StateFollower | None:
        return self._follower

    def watch_statuses(self) -> list[WatchStatus]:
        found = [w.status for w in (self._configmap_watcher, self._slice_watcher) if w is not None]
        state = self._state_source.watch_status if self._state_source is not None else None
        return [*found, state] if state is not None else found

    def describe(self) -> dict[str, object]:
        data = self.status.describe()
        data["watches"] = [status.describe() for status in self.watch_statuses()]
        data["pending_config"] = self._pending is not None
        data["rebuilds"] = self._applier.swaps
        data["last_rebuild_ms"] = round(self._applier.last_swap_seconds * 1000, 3)
        return data

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._configmap_watcher = ResourceWatcher(
            f"configmap/{self.configmap}",
            list_call(self._api_factory(), CONFIGMAPS),
            {"namespace": self.namespace, "field_selector": f"metadata.name={self.configmap}"},
            lambda items: self._from_thread(self._configmap_changed, items),
            self._timing,
        )
        self._configmap_watcher.start()
        if self._follower is not None:
            started = self._loop.create_task(self._follower.start())
            self._follower_start = log_if_it_fails(started, "following the shard state", log)

    async def stop(self) -> None:
        if self._follower is not None:
            if self._follower_start is not None:
                await asyncio.gather(self._follower_start, return_exceptions=True)
            await self._follower.stop()
        for watcher in (self._configmap_watcher, self._slice_watcher):
            if watcher is not None:
                watcher.stop()
        for handle in (self._rebuild_handle, self._pending_deadline):
            if handle is not None:
                handle.cancel()

    def reload(self, force: bool = False) -> bool:
        """SIGHUP: the watches keep the config current; nothing to re-read."""
        return self._applier.config is not None

    def _from_thread(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    # -- ConfigMap -------------------------------------------------------------------------------

    def _configmap_changed(self, items: dict[str, RawObject]) -> None:
        obj = items.get(self.configmap)
        applier = self._applier
        if obj is None:
            if applier.config is None and self._pending is None:
                applier.status.note = "configmap not found: waiting for it"
            else:
                applier.status.note = "configmap deleted: keeping the last good config"
                log.error(
                    "configmap %s/%s deleted; keeping the last good config", self.namespace, self.configmap
                )
                self._metrics.reload("missing")
            applier.forget_digest()
            return
        applier.status.note = None
        text = (obj.get("data") or {}).get(CONFIG_KEY)
        if text is None:
            applier.forget_digest()
            applier.reject([f"configmap {self.configmap}: no {CONFIG_KEY!r} key"])
            return
        config = applier.parse(text)
        if config is None:
            return
        if self._follower is not None:
            # The leader hands it off (or commits it); what is applied is the shard state.
            applier.accepted()
            self.desired_text = text
            if self._on_desired is not None:
                self._on_desired()
            return
        self._put_in_force(config, None)

    def _view_changed(self, view: View) -> None:
        """A newer shard state: its config (the one handed off from, while fencing) goes in force."""
        incoming = view.incoming.config if view.incoming is not None else None
        self._put_in_force(view.current.config, view, incoming)

    def _put_in_force(
        self, config: ShardConfig, view: View | None, incoming: ShardConfig | None = None
    ) -> None:
        # While fencing, the groups handed to are watched too: their pods are known at the commit.
        configs = (config, incoming) if incoming is not None else (config,)
        services = tuple(sorted({g.service for c in configs for g in c.groups if g.service}))
        if services != self._slice_services:
            self._watch_slices(services)
        if self._slices_synced or not services:
            self._apply(config, view)
        else:
            # Wait (briefly) for the new Services' pods, so a new group does not start empty
            # and refuse writes that it could serve a moment later.
            self._pending = (config, view)
            if self._pending_deadline is not None:
                self._pending_deadline.cancel()
            assert self._loop is not None
            self._pending_deadline = self._loop.call_later(self._sync_timeout, self._apply_pending)

    def _apply(self, config: ShardConfig, view: View | None) -> None:
        self._pending = None
        if self._pending_deadline is not None:
            self._pending_deadline.cancel()
            self._pending_deadline = None
        self._applier.apply_soon(config, lambda: pods_by_group(config, self._slices), view)

    def _apply_pending(self) -> None:
        self._pending_deadline = None
        if self._pending is not None:
            log.warning(
                "EndpointSlices not listed within %.1fs; applying the config anyway", self._sync_timeout
            )
            self._apply(*self._pending)

    # -- EndpointSlices --------------------------------------------------------------------------

    def _watch_slices(self, services: tuple[str, ...]) -> None:
        """One watch for all groups' Services (a set-based label selector), restarted when they change."""
        if self._slice_watcher is not None:
            self._slice_watcher.stop()
            self._slice_watcher = None
        self._slice_services = services
        self._slices_synced = False
        if not services:
            return
        generation = object()
        self._slice_generation = generation
        self._slice_watcher = ResourceWatcher(
            "endpointslices",
            list_call(self._api_factory(), ENDPOINT_SLICES),
            {
                "namespace": self.namespace,
                "label_selector": f"{SERVICE_NAME_LABEL} in ({','.join(services)})",
            },
            lambda items: self._from_thread(self._slices_changed, generation, items),
            self._timing,
        )
        self._slice_watcher.start()

    def _slices_changed(self, generation: object, items: dict[str, RawObject]) -> None:
        if generation is not self._slice_generation:
            return  # from a watch that has been replaced
        self._slices = items
        self._slices_synced = True
        if self._pending is not None:
            self._apply(*self._pending)
        elif self._rebuild_handle is None and self._loop is not None:
            # Coalesce: however many events arrive in this window, one rebuild follows.
            self._rebuild_handle = self._loop.call_later(self._coalesce, self._rebuild)

    def _rebuild(self) -> None:
        self._rebuild_handle = None
        config = self._applier.config
        if config is not None:
            self._applier.rebuild(pods_by_group(config, self._slices))
