"""Where the shard state lives: the state ConfigMap, or the state file.

Both stores give the leader what the hand-off's safety argument needs of them: a read that
returns the latest state written (a GET of the ConfigMap is a quorum read; a file is renamed
into place), and a compare-and-swap write, so the states form one linear history even when
two replicas believe they lead (docs/design/014-ownership-handoff.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.coordination.kube import (
    CONFIGMAPS,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Conflict,
    Objects,
    RawObject,
    check_name,
    resource_version,
)
from gateway.shardstate import STATE_KEY, ShardState, StateError, state_configmap_name

if TYPE_CHECKING:
    from kubernetes import client

__all__ = ["ConfigMapStateStore", "Conflict", "FileStateStore", "StateStore"]


class StateStore(Protocol):
    name: str  # for logs and /debug/ring

    async def read(self) -> tuple[ShardState | None, str | None]:
        """(state, version), read directly from the source (linearizable). ``(None, None)``:
        no state yet; ``(None, version)``: the holder exists without a state in it (write to
        it at ``version``). StateError if the stored document is not a valid state."""

    async def create(self, state: ShardState) -> str:
        """Store the first state; its version. Conflict if a state exists already."""

    async def write(self, state: ShardState, version: str) -> str:
        """Replace the state stored at ``version``; the new version. Conflict if it changed."""


class ConfigMapStateStore:
    """The ConfigMap ``NAME-state`` (key ``state.json``); versions are its resourceVersions."""

    def __init__(
        self,
        api_factory: Callable[[], client.ApiClient],
        namespace: str,
        configmap: str,
        *,
        timeout: float = 5.0,
    ) -> None:
        self.configmap = check_name(state_configmap_name(configmap))
        self.name = f"configmap {namespace}/{self.configmap}"
        self._objects = Objects(api_factory, CONFIGMAPS, namespace, timeout)
        self._last: RawObject | None = None  # the object last read or written (kept metadata)

    async def read(self) -> tuple[ShardState | None, str | None]:
        obj = await asyncio.to_thread(self._objects.get, self.configmap)
        self._last = obj
        if obj is None:
            return None, None
        version = resource_version(obj)
        text = (obj.get("data") or {}).get(STATE_KEY)
        if text is None:
            return None, version
        if not isinstance(text, str):
            raise StateError(f"{self.name}: {STATE_KEY!r} is not a string")
        return ShardState.from_json(text), version

    async def create(self, state: ShardState) -> str:
        body: RawObject = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.configmap,
                "namespace": self._objects.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            },
            "data": {STATE_KEY: state.to_json()},
        }
        obj = await asyncio.to_thread(self._objects.create, body)
        self._last = obj
        return resource_version(obj)

    async def write(self, state: ShardState, version: str) -> str:
        body = self._body_at(version)
        body["data"] = {**(body.get("data") or {}), STATE_KEY: state.to_json()}
        obj = await asyncio.to_thread(self._objects.replace, self.configmap, body)
        self._last = obj
        return resource_version(obj)

    def _body_at(self, version: str) -> RawObject:
        """The object to PUT at ``version``: the one last seen if it is that version (so its
        labels, annotations and other keys are kept), else a bare one."""
        last = self._last
        if last is not None and (last.get("metadata") or {}).get("resourceVersion") == version:
            meta = dict(last.get("metadata") or {})
            labels = {**(meta.get("labels") or {}), MANAGED_BY_LABEL: MANAGED_BY}
            kept = {k: meta[k] for k in ("annotations", "ownerReferences", "uid") if meta.get(k)}
            data = dict(last.get("data") or {})
        else:
            labels, kept, data = {MANAGED_BY_LABEL: MANAGED_BY}, {}, {}
        metadata = {
            "name": self.configmap,
            "namespace": self._objects.namespace,
            "resourceVersion": version,
            "labels": labels,
            **kept,
        }
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


class FileStateStore:
    """The state file; its version is the generation it holds (every write raises it, so a
    generation names one state of the history). Writes take an ``fcntl`` lock on a side file
    (``PATH.lock``) and replace the file atomically: a reader sees the old or the new state
    whole, never a part."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.name = f"file {path}"

    async def read(self) -> tuple[ShardState | None, str | None]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> tuple[ShardState | None, str | None]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"{self.name}: {exc}") from None
        state = ShardState.from_json(text)
        return state, str(state.generation)

    async def create(self, state: ShardState) -> str:
        return await asyncio.to_thread(self._swap, state, None)

    def read_now(self) -> ShardState | None:
        """``read``, blocking (for start-up code that runs before the event loop)."""
        return self._read()[0]

    def create_now(self, state: ShardState) -> ShardState:
        """Store ``state`` as the first state unless there is one; the state stored afterwards
        (``state``, or the one another process created first). Blocking, as ``read_now``."""
        try:
            self._swap(state, None)
        except Conflict:
            found = self.read_now()
            if found is None:  # created and removed again meanwhile: a hand at work
                raise
            return found
        return state

    async def write(self, state: ShardState, version: str) -> str:
        return await asyncio.to_thread(self._swap, state, version)

    def _swap(self, state: ShardState, expected: str | None) -> str:
        with self._locked():
            _, current = self._read()
            if current != expected:
                held = "no state" if current is None else f"generation {current}"
                wanted = "none" if expected is None else f"generation {expected}"
                raise Conflict(f"{self.name} holds {held}, expected {wanted}")
            self._replace(state.to_json())
        return str(state.generation)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _replace(self, text: str) -> None:
        directory = self.path.parent
        fd, scratch = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fchmod(handle.fileno(), 0o644)  # readable by the fences, as a plain file is
                os.fsync(handle.fileno())
            os.replace(scratch, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(scratch)
            raise
        # The rename itself survives a crash only once the directory is synced.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
