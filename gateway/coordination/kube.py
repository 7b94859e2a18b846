"""Single-object calls on the Kubernetes API (get, list, create, replace, delete) for the
coordinator's ConfigMap and Leases.

As in ``gateway.discovery.kubernetes``, requests go through the official client's own machinery
(``ApiClient.param_serialize`` and ``call_api``: its configuration, credentials and connection
pool) and never through the generated API classes (importing ``CoreV1Api`` costs ~21 MB of
resident memory). Every call here blocks: run it in ``asyncio.to_thread``. Nothing in this
module imports the client at run time, so a gateway on a file source never loads it.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from kubernetes import client

RawObject = dict[str, Any]

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "shardgate"

CONFIGMAPS = "/api/v1/namespaces/{namespace}/configmaps"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class Conflict(Exception):
    """A compare-and-swap lost: the object changed since it was read, or it exists already (or
    is gone). Nothing was written; re-read before deciding again."""


class ApiError(Exception):
    """The API server answered a status other than 2xx (and not a conflict)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"API server answered {status}: {message}")
        self.status = status


def check_name(name: str) -> str:
    """``name`` if the API server takes it as an object name (an RFC 1123 subdomain)."""
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise ValueError(f"{name!r} is not a valid Kubernetes object name (lower-case RFC 1123 subdomain)")
    return name


def micro_time(at: float) -> str:
    """A MicroTime as the API server takes and renders it: UTC, six fraction digits, ``Z``."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: object) -> float | None:
    """A MicroTime or Time (RFC 3339) as unix seconds; None if absent or not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Objects:
    """One kind's namespaced objects (``collection``: the collection path with ``{namespace}``).

    The client is made by ``api_factory`` on first use (in the calling thread: it may read a
    kubeconfig), then shared; ``timeout`` bounds every call (seconds, connect plus read).
    """

    def __init__(
        self,
        api_factory: Callable[[], client.ApiClient],
        collection: str,
        namespace: str,
        timeout: float,
    ) -> None:
        self._api_factory = api_factory
        self._collection = collection
        self.namespace = namespace
        self.timeout = timeout
        self._api: client.ApiClient | None = None
        self._lock = threading.Lock()

    def _client(self) -> client.ApiClient:
        with self._lock:
            if self._api is None:
                self._api = self._api_factory()
            return self._api

    def _call(
        self,
        method: str,
        name: str | None,
        *,
        query: Iterable[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """One request; (status, decoded JSON body) for any answer, an exception for none."""
        api = self._client()
        path = self._collection
        if name is not None:
            path += "/" + quote(name, safe="")
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = api.param_serialize(
            method=method,
            resource_path=path,
            path_params={"namespace": self.namespace},
            query_params=list(query),
            header_params=headers,
            body=dict(body) if body is not None else None,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request, _request_timeout=timeout or self.timeout).response
        try:
            status, data = int(response.status), response.data
        finally:
            response.release_conn()
        try:
            document = json.loads(data) if data else None
        except ValueError:
            document = None
        return status, document

    @staticmethod
    def _fail(status: int, document: Any) -> Exception:
        message = document.get("message") if isinstance(document, dict) else None
        if status == 409:
            return Conflict(message or "conflict")
        return ApiError(status, str(message or "(no message)"))

    def get(self, name: str, timeout: float | None = None) -> RawObject | None:
        """The object (a quorum read: the API server reads etcd), or None if there is none."""
        status, document = self._call("GET", name, timeout=timeout)
        if status == 404:
            return None
        if not 200 <= status < 300 or not isinstance(document, dict):
            raise self._fail(status, document)
        return document

    def list(self, label_selector: str, timeout: float | None = None) -> list[RawObject]:
        status, document = self._call("GET", None, query=[("labelSelector", label_selector)], timeout=timeout)
        if not 200 <= status < 300 or not isinstance(document, dict):
            raise self._fail(status, document)
        return [item for item in document.get("items") or () if isinstance(item, dict)]

    def create(self, body: Mapping[str, Any], timeout: float | None = None) -> RawObject:
        """POST; Conflict if an object of that name exists."""
        status, document = self._call("POST", None, body=body, timeout=timeout)
        if not 200 <= status < 300 or not isinstance(document, dict):
            raise self._fail(status, document)
        return document

    def replace(self, name: str, body: Mapping[str, Any], timeout: float | None = None) -> RawObject:
        """PUT with the body's ``metadata.resourceVersion`` as precondition; Conflict if the
        object changed since or is gone."""
        status, document = self._call("PUT", name, body=body, timeout=timeout)
        if status == 404:
            raise Conflict(f"{name} is gone")
        if not 200 <= status < 300 or not isinstance(document, dict):
            raise self._fail(status, document)
        return document

    def delete(self, name: str, resource_version: str | None = None, timeout: float | None = None) -> bool:
        """DELETE (only if still at ``resource_version``, when given): False if already gone,
        Conflict if it changed."""
        options: RawObject = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if resource_version is not None:
            options["preconditions"] = {"resourceVersion": resource_version}
        status, document = self._call("DELETE", name, body=options, timeout=timeout)
        if status == 404:
            return False
        if not 200 <= status < 300:
            raise self._fail(status, document)
        return True


def resource_version(obj: Mapping[str, Any]) -> str:
    version = (obj.get("metadata") or {}).get("resourceVersion")
    if not isinstance(version, str) or not version:
        raise ApiError(200, "the object has no metadata.resourceVersion")
    return version
