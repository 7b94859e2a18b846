"""``Fence.from_configmap`` against the API-server double (the real ``kubernetes`` client):
the state ConfigMap is read and watched, changes apply promptly, the lease runs out while the
API server is down and is confirmed again when it is back, and nothing is accepted before the
state exists. One test runs a backend process that finds everything from its environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.build import PURE_PYTHON_ENV
from gateway.discovery.kubernetes import WatchTiming
from gateway.fence import Fence
from gateway.shardstate import View
from tests.fence.conftest import (
    CONFIGMAP,
    GROWN,
    NS,
    OWN,
    Calls,
    Client,
    config_text,
    eventually,
    fencing,
    key_of,
    moving_key,
    put_state,
    run,
    serve_aiohttp,
    stable,
)
from tests.k8s.apiserver import FakeApiServer

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_CONFIGMAP = f"{CONFIGMAP}-state"
STATE_ITEM_PATH = f"/api/v1/namespaces/{NS}/configmaps/{STATE_CONFIGMAP}"
TIMING = WatchTiming(
    watch_timeout=30.0, connect_timeout=1.0, list_timeout=5.0, backoff_initial=0.05, backoff_max=0.5
)


def configmap_fence(api_factory: Callable[[], Any], **kwargs: Any) -> Fence:
    return Fence.from_configmap(
        CONFIGMAP, namespace=NS, group=OWN, api_factory=api_factory, watch_timing=TIMING, **kwargs
    )


async def confirmed_at(client: Client, generation: int) -> dict[str, Any]:
    return await client.until_state(lambda s: s["generation"] == generation and s["confirmed"])


def test_the_state_configmap_is_read_watched_and_followed(
    api: FakeApiServer, api_factory: Callable[[], Any]
) -> None:
    # The desired config says four groups; the state (what the fleet acts on) says three.
    api.put_configmap(NS, CONFIGMAP, {"shards.yaml": config_text(GROWN)})
    put_state(api, stable(1, config_text()))
    fence = configmap_fence(api_factory, confirm_interval=3600)  # only the watch can bring changes
    moving = moving_key(OWN, "group-4")

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            state = await confirmed_at(client, 1)
            assert state["epoch"] == View.of(stable(1, config_text())).epoch  # the state's, not the desired's
            assert state["source"] == f"configmap {NS}/{STATE_CONFIGMAP}"
            assert (await client.write(moving)).status == 200
            gets = [r for r in api.requests() if r.verb == "get"]
            assert gets and all(r.path == STATE_ITEM_PATH for r in gets)
            assert await eventually(lambda: api.watch_count("configmaps") == 1)
            watches = [r for r in api.requests() if r.verb == "watch"]
            assert {r.query.get("fieldSelector") for r in watches} == {f"metadata.name={STATE_CONFIGMAP}"}
            assert all(r.namespace == NS for r in api.requests() if r.resource == "configmaps")

            put_state(api, fencing(2, config_text(), config_text(GROWN)))
            state = await client.until_state(lambda s: s["generation"] == 2)
            assert (state["phase"], state["next_epoch"]) == (
                "fencing",
                View.of(stable(9, config_text(GROWN))).epoch,
            )
            refused = await client.write(moving)
            assert (refused.status, refused.error, refused.body["owner"]) == (421, "shard_moving", "group-4")
            # a view brought by the watch is confirmed by a GET made at once, not an hour later
            # (the earlier GET's confirmation still covers it: this one is looked for, not awaited)
            await confirmed_at(client, 2)
            assert await eventually(lambda: sum(1 for r in api.requests() if r.verb == "get") > len(gets))

            put_state(api, "{broken")  # an invalid state: logged, the last good view stays
            put_state(api, stable(1, config_text()))  # an older generation: ignored
            state = await client.state(generation=3)
            assert (state["generation"], state["phase"]) == (2, "fencing")

            def read_count() -> int:
                return sum(1 for r in api.requests() if r.verb == "get")

            before_three = read_count()
            put_state(api, stable(3, config_text(GROWN)))
            await client.until_state(lambda s: s["generation"] == 3 and s["phase"] == "stable")
            assert (await client.write(moving)).error == "misdirected_write"
            assert await eventually(lambda: read_count() > before_three)  # the GET it triggers

            # read_soon (a gateway's answer to a fence's 421) reads the state now, not in an
            # hour: with the watch's GET done, no other read is due
            before = read_count()
            fence.follower.read_soon()
            assert await eventually(lambda: read_count() > before)

    run(scenario)


def test_writes_continue_through_an_outage_until_the_lease_runs_out(
    api: FakeApiServer, api_factory: Callable[[], Any]
) -> None:
    lease = 4.0
    put_state(api, stable(1, config_text(lease=lease)))
    fence = configmap_fence(api_factory)  # confirmations every lease / 6
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            state = await confirmed_at(client, 1)
            assert state["lease_seconds"] == lease
            await asyncio.to_thread(api.set_down, True)
            # The last confirmation was at most one interval (lease / 6) before the outage began.
            assert (await client.write(own)).status == 200
            assert (await client.read(own)).status == 200

            async def unconfirmed() -> bool:
                return (await client.write(own)).status == 503

            assert await eventually(unconfirmed, timeout=lease + 10)
            reply = await client.write(own)
            assert (reply.status, reply.error, reply.headers.get("Retry-After")) == (
                503,
                "shard_state_unconfirmed",
                "1",
            )
            assert reply.headers["X-Shard-Fence"] == "shard_state_unconfirmed"
            assert (await client.read(own)).status == 200  # reads still pass
            state = await client.state()
            assert not state["confirmed"] and state["confirmed_age"] > lease and state["generation"] == 1

            await asyncio.to_thread(api.set_down, False)
            await confirmed_at(client, 1)
            assert (await client.write(own)).status == 200
            state = await client.state()
            assert state["refused"].get("shard_state_unconfirmed", 0) >= 2

    run(scenario)


def test_a_watch_event_applies_a_state_but_never_confirms_it(
    api: FakeApiServer, api_factory: Callable[[], Any]
) -> None:
    lease = 2.0
    put_state(api, stable(1, config_text(lease=lease)))
    fence = configmap_fence(api_factory)
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            await confirmed_at(client, 1)
            assert await eventually(lambda: api.watch_count("configmaps") == 1)
            api.fail_requests(1_000_000, 500, verb="get")  # quorum reads fail; the watch works
            generations = iter(range(2, 1_000_000))

            async def new_states() -> None:  # a stream of watch events, none of them a read
                while True:
                    put_state(api, stable(next(generations), config_text(lease=lease)))
                    await asyncio.sleep(0.1)

            writer = asyncio.create_task(new_states())
            try:

                async def refused() -> bool:
                    return (await client.write(own)).error == "shard_state_unconfirmed"

                assert await eventually(refused, timeout=lease + 10)
                state = await client.state()
                assert state["generation"] >= 3 and not state["confirmed"]  # followed, unconfirmed
            finally:
                writer.cancel()
            api.clear_failures()
            state = await client.until_state(lambda s: s["confirmed"])
            assert state["generation"] >= 3
            assert (await client.write(own)).status == 200

    run(scenario)


def test_before_the_state_configmap_exists_writes_wait_and_reads_pass(
    api: FakeApiServer, api_factory: Callable[[], Any]
) -> None:
    fence = configmap_fence(api_factory)
    own = key_of(OWN)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            assert await eventually(lambda: api.count(verb="get") >= 1)  # it did look
            state = await client.state()
            assert (state["generation"], state["confirmed"]) == (None, False)
            reply = await client.write(own)
            assert (reply.status, reply.error) == (503, "shard_state_unconfirmed")
            assert (await client.read(own)).status == 200
            put_state(api, stable(1, config_text()))
            await confirmed_at(client, 1)
            assert (await client.write(own)).status == 200

    run(scenario)


def test_generation_query_reads_the_configmap_once_for_many_callers(
    api: FakeApiServer, api_factory: Callable[[], Any]
) -> None:
    put_state(api, stable(1, config_text()))
    fence = configmap_fence(api_factory, confirm_interval=3600)

    async def scenario() -> None:
        async with serve_aiohttp(fence, Calls()) as client:
            await confirmed_at(client, 1)
            before = api.count(verb="get")
            states = await asyncio.gather(*(client.state(generation=7) for _ in range(20)))
            assert all(s["generation"] == 1 for s in states)  # the source says 1: nothing else
            reads = api.count(verb="get") - before
            # every caller waited for a read sent after it asked, and they shared them (one at a
            # time: a caller that came during a read waits for the next one)
            assert 1 <= reads <= 10, reads

    run(scenario)


def test_the_group_is_required_and_the_namespace_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, api_factory: Callable[[], Any]
) -> None:
    monkeypatch.delenv("SHARDGATE_GROUP", raising=False)
    with pytest.raises(ValueError, match="SHARDGATE_GROUP"):
        Fence.from_file(str(tmp_path / "shards.yaml"))
    with pytest.raises(ValueError, match="SHARDGATE_GROUP"):
        Fence.from_configmap(CONFIGMAP, namespace=NS, api_factory=api_factory)
    monkeypatch.setenv("SHARDGATE_GROUP", "group-7")
    fence = Fence.from_file(str(tmp_path / "shards.yaml"))
    assert fence.group == "group-7" and fence.source.name == f"file {tmp_path}/shards.yaml.state"
    assert (
        Fence.from_file("x", state_path="/elsewhere/state.json").source.name == "file /elsewhere/state.json"
    )

    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "namespace").write_text("payments\n")
    monkeypatch.delenv("SHARDGATE_NAMESPACE", raising=False)
    monkeypatch.setenv("SHARDGATE_SERVICE_ACCOUNT_DIR", str(account))
    fence = Fence.from_configmap(CONFIGMAP, api_factory=api_factory)
    assert fence.source.name == f"configmap payments/{STATE_CONFIGMAP}"
    monkeypatch.setenv("SHARDGATE_NAMESPACE", "orders")
    assert Fence.from_configmap(CONFIGMAP, api_factory=api_factory).source.name.startswith(
        "configmap orders/"
    )
    assert Fence.from_configmap(CONFIGMAP, "given", api_factory=api_factory).source.name.startswith(
        "configmap given/"
    )


# ---------------------------------------------------------------------------------------------
# A backend process configured by its environment only


@contextlib.contextmanager
def backend_process(kubeconfig: Path, tmp_path: Path) -> Iterator[int]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SHARDGATE_", "KUBERNETES_")) or k == PURE_PYTHON_ENV
    }
    env |= {
        "KUBECONFIG": str(kubeconfig),
        "SHARDGATE_NAMESPACE": NS,  # as the gateway's: not the kubeconfig context's
        "SHARDGATE_GROUP": OWN,
        "SHARDGATE_SERVICE_ACCOUNT_DIR": str(tmp_path / "no-service-account"),
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "backend.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fence.backend", CONFIGMAP],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line.isdigit(), f"backend did not start: {line!r}\n{(tmp_path / 'backend.log').read_text()}"
        yield int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def http_json(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, method=method, headers=headers or {}, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_backend_finds_its_group_namespace_and_credentials_in_its_environment(
    api: FakeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    put_state(api, stable(4, config_text()))
    api.put_configmap("default", STATE_CONFIGMAP, {"state.json": stable(9, config_text(GROWN)).to_json()})
    with backend_process(kubeconfig, tmp_path) as port:
        base = f"http://127.0.0.1:{port}"
        state: dict[str, Any] = {}

        def confirmed() -> bool:
            try:  # the port is printed before the app listens on it
                state.update(http_json(base + "/.well-known/shardgate/fence")[1])
            except OSError:
                return False
            return state["generation"] == 4 and state["confirmed"]

        deadline = time.monotonic() + 20
        while not confirmed():
            assert time.monotonic() < deadline, f"the backend never confirmed generation 4: {state}"
            time.sleep(0.05)
        assert state["group"] == OWN and state["source"] == f"configmap {NS}/{STATE_CONFIGMAP}"
        own, other = key_of(OWN), key_of("group-1")
        assert http_json(base + "/orders", "POST", {"User-ID": own}) == (200, {"handled": True})
        status, body = http_json(base + "/orders", "POST", {"User-ID": other})
        assert (status, body["error"], body["owner"]) == (421, "misdirected_write", "group-1")
