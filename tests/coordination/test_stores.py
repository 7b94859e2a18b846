"""The state stores: the ConfigMap (through the real client, against the API-server double) and
the file. Both create once, read what was written last, and compare-and-swap: a stale version
is a Conflict and changes nothing. The file is replaced atomically, under a lock."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from gateway.coordination import ConfigMapStateStore, Conflict, FileStateStore
from gateway.shardstate import STATE_KEY, Phase, ShardState, StateError
from tests.coordination.conftest import CONFIGMAP, NS, SHRUNK, STATE_CONFIGMAP, Kube, config_text, run
from tests.k8s.apiserver import FakeApiServer

A, B = config_text(), config_text(SHRUNK)


def stable(generation: int, config: str = A) -> ShardState:
    return ShardState(generation=generation, phase=Phase.STABLE, config=config, since=time.time(), leader="t")


def test_the_configmap_store_creates_reads_and_compares_and_swaps(api: FakeApiServer, kube: Kube) -> None:
    store = ConfigMapStateStore(kube.factory("store-a"), NS, CONFIGMAP)
    other = ConfigMapStateStore(kube.factory("store-b"), NS, CONFIGMAP)

    async def scenario() -> None:
        assert await store.read() == (None, None)
        first = await store.create(stable(1))
        state, version = await other.read()
        assert state is not None and (state.generation, state.config, version) == (1, A, first)
        with pytest.raises(Conflict):
            await other.create(stable(1, B))

        second = await store.write(stable(2, B), first)
        assert second != first
        state, version = await other.read()
        assert state is not None and (state.generation, state.config, version) == (2, B, second)

        # A writer that read version `first` lost the race: nothing it writes lands.
        with pytest.raises(Conflict):
            await other.write(stable(2, A), first)
        state, version = await store.read()
        assert state is not None and (state.generation, state.config, version) == (2, B, second)

    run(scenario)
    stored = api.get_object("configmaps", NS, STATE_CONFIGMAP)
    assert stored is not None
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "shardgate"}
    assert ShardState.from_json(stored["data"][STATE_KEY]).generation == 2


def test_a_state_configmap_made_by_hand_without_the_key_is_written_in_place(
    api: FakeApiServer, kube: Kube
) -> None:
    api.put_configmap(NS, STATE_CONFIGMAP, {"note": "made by hand"}, labels={"team": "storage"})
    store = ConfigMapStateStore(kube.factory("store-a"), NS, CONFIGMAP)

    async def scenario() -> None:
        state, version = await store.read()
        assert state is None and version is not None
        await store.write(stable(1), version)

    run(scenario)
    stored = api.get_object("configmaps", NS, STATE_CONFIGMAP)
    assert stored is not None
    assert stored["data"]["note"] == "made by hand" and STATE_KEY in stored["data"]
    assert stored["metadata"]["labels"] == {"team": "storage", "app.kubernetes.io/managed-by": "shardgate"}


def test_a_state_document_that_is_not_a_state_is_an_error_not_absent(api: FakeApiServer, kube: Kube) -> None:
    api.put_configmap(NS, STATE_CONFIGMAP, {STATE_KEY: '{"generation": "eight"}'})
    store = ConfigMapStateStore(kube.factory("store-a"), NS, CONFIGMAP)

    async def scenario() -> None:
        with pytest.raises(StateError):
            await store.read()

    run(scenario)


def test_the_file_store_creates_reads_and_compares_and_swaps(tmp_path: Path) -> None:
    path = tmp_path / "shards.yaml.state"
    store, other = FileStateStore(str(path)), FileStateStore(str(path))

    async def scenario() -> None:
        assert await store.read() == (None, None)
        assert await store.create(stable(1)) == "1"
        with pytest.raises(Conflict):
            await other.create(stable(1, B))
        state, version = await other.read()
        assert state is not None and (state.generation, state.config, version) == (1, A, "1")

        assert await other.write(stable(2, B), "1") == "2"
        with pytest.raises(Conflict):
            await store.write(stable(2, A), "1")  # read generation 1: stale
        state, version = await store.read()
        assert state is not None and (state.generation, state.config, version) == (2, B, "2")

    run(scenario)
    assert path.stat().st_mode & 0o777 == 0o644  # the fences (other users, maybe) read it
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["shards.yaml.state", "shards.yaml.state.lock"]  # no scratch files left


def test_a_reader_never_sees_a_partial_state_file(tmp_path: Path) -> None:
    """Large states replaced in a loop while another thread reads the file as the fences do:
    every read is one whole state, and generations never go back."""
    path = tmp_path / "shards.yaml.state"
    store = FileStateStore(str(path))
    padding = "# " + "x" * 400_000 + "\n"  # a config text of ~400 kB: a write takes many syscalls
    stop = threading.Event()
    reads: list[int] = []
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                generation = ShardState.from_json(text).generation
            except StateError as exc:
                problems.append(f"read {len(text)} bytes: {exc}")
                return
            if reads and generation < reads[-1]:
                problems.append(f"generation {generation} after {reads[-1]}")
            reads.append(generation)

    async def scenario() -> None:
        version = await store.create(stable(1, A + padding))
        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for generation in range(2, 80):
                version = await store.write(stable(generation, A + padding), version)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 10)

    run(scenario)
    assert not problems, problems[:3]
    assert len(reads) >= 20 and reads[-1] > reads[0], f"the reader barely overlapped the writes: {len(reads)}"


def test_two_writers_on_one_file_version_never_both_succeed(tmp_path: Path) -> None:
    """The compare-and-swap holds under concurrency: the check and the rename happen under one
    lock, so of two writers that read the same generation exactly one wins each time."""
    path = str(tmp_path / "shards.yaml.state")
    stores = [FileStateStore(path), FileStateStore(path)]

    async def scenario() -> None:
        version = await stores[0].create(stable(1))
        barrier = threading.Barrier(2)
        for generation in range(2, 42):

            def attempt(
                store: FileStateStore, config: str, expected: str = version, generation: int = generation
            ) -> str | None:
                barrier.wait(5)
                try:
                    return asyncio.run(store.write(stable(generation, config), expected))
                except Conflict:
                    return None

            results = await asyncio.gather(
                asyncio.to_thread(attempt, stores[0], A), asyncio.to_thread(attempt, stores[1], B)
            )
            winners = [r for r in results if r is not None]
            assert len(winners) == 1, (generation, results)
            version = winners[0]
            state, _ = await stores[0].read()
            assert state is not None and state.generation == generation
            assert state.config == (A if results[0] is not None else B)

    run(scenario)
    assert os.path.exists(path + ".lock")


def test_the_file_store_serves_start_up_code_without_an_event_loop(tmp_path: Path) -> None:
    """``read_now``/``create_now``: the gateway's start-up reads the state before its loop runs,
    and creates the first one unless another process was first (then that one is in force)."""
    store = FileStateStore(str(tmp_path / "shards.yaml.state"))
    assert store.read_now() is None
    first = stable(1)
    assert store.create_now(first) == first
    assert store.create_now(stable(1, B)) == first  # exists already: the stored one, unchanged
    assert store.read_now() == first
    (tmp_path / "shards.yaml.state").write_text("{")
    with pytest.raises(StateError):
        store.read_now()
