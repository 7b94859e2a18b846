"""Offline commands (validate, route, plan) and the argparse front end."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from uhashring import HashRing

from gateway import cli, offline
from gateway.config import ShardConfig, parse_shard_config
from gateway.ring import config_epoch
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def config_doc(groups: Sequence[tuple[str, int]], vnodes: int = 160, **routing: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "routing": routing,
        "ring": {"vnodes": vnodes},
        "groups": [
            {"name": n, "weight": w, "endpoints": [f"127.0.0.1:{9000 + i}"]}
            for i, (n, w) in enumerate(groups)
        ],
    }


def equal(*names: str) -> list[tuple[str, int]]:
    return [(name, 1) for name in names]


def write(tmp_path: Path, name: str, doc: dict[str, Any] | str) -> str:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def recipe(config: ShardConfig) -> HashRing:
    nodes = {g.name: {"weight": g.weight, "vnodes": config.ring.vnodes} for g in config.groups}
    return HashRing(nodes=nodes, hash_fn="ketama")


class Streams:
    def __init__(self) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()

    @property
    def out_lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    @property
    def err_lines(self) -> list[str]:
        return self.err.getvalue().splitlines()


THREE = equal("group-1", "group-2", "group-3")
FOUR = equal("group-1", "group-2", "group-3", "group-4")

# ---------------------------------------------------------------------------------------------
# validate


def test_validate_ok_prints_one_summary_line(tmp_path: Path) -> None:
    doc = config_doc(THREE, reads="owner")
    doc["groups"][2] = {"name": "group-3", "service": "svc-3", "port": "http"}
    path = write(tmp_path, "shards.yaml", doc)
    io_ = Streams()
    assert offline.validate(path, io_.out, io_.err) == 0
    epoch = config_epoch(parse_shard_config(yaml.safe_dump(doc)))
    assert io_.out_lines == [
        f"OK {path}: 3 groups (2 with endpoints, 1 with a service), vnodes 160, reads owner, epoch {epoch}"
    ]
    assert io_.err_lines == []


def test_validate_bad_prints_one_line_per_problem(tmp_path: Path) -> None:
    doc = config_doc([("group-1", 0), ("group-1", 1)], vnodes=0)
    path = write(tmp_path, "bad.yaml", doc)
    io_ = Streams()
    assert offline.validate(path, io_.out, io_.err) == 1
    assert io_.out_lines == []
    assert sorted(io_.err_lines) == sorted(
        [
            f"{path}: ring.vnodes: Input should be greater than or equal to 1",
            f"{path}: groups.0.weight: Input should be greater than or equal to 1",
        ]
    )


def test_validate_reports_duplicate_names_and_yaml_errors(tmp_path: Path) -> None:
    io_ = Streams()
    dup = write(tmp_path, "dup.yaml", config_doc(equal("g", "g")))
    assert offline.validate(dup, io_.out, io_.err) == 1
    broken = write(tmp_path, "broken.yaml", "version: 1\ngroups: [\n")
    assert offline.validate(broken, io_.out, io_.err) == 1
    first, second = io_.err_lines
    assert first == f"{dup}: groups: group name 'g' is used more than once"
    assert second.startswith(f"{broken}: line 3, column 1: invalid YAML: ")


def test_validate_missing_file(tmp_path: Path) -> None:
    io_ = Streams()
    missing = str(tmp_path / "nope.yaml")
    assert offline.validate(missing, io_.out, io_.err) == 1
    assert io_.err_lines == [f"{missing}: (file): cannot read: No such file or directory"]


def test_validate_warns_about_groups_without_ring_points(tmp_path: Path) -> None:
    path = write(tmp_path, "tiny.yaml", config_doc([("big", 1000), ("small", 1)], vnodes=1))
    io_ = Streams()
    assert offline.validate(path, io_.out, io_.err) == 0
    assert len(io_.out_lines) == 1 and io_.out_lines[0].startswith(f"OK {path}: 2 groups")
    assert io_.err_lines == [
        f"warning: {path}: groups.1.weight: group 'small' gets no ring points (ring.vnodes x groups x"
        " weight < total weight), so it owns no key; raise ring.vnodes or its weight"
    ]


@pytest.mark.parametrize(
    ("name", "summary"),
    [
        ("local.yaml", "3 groups (3 with endpoints), vnodes 160, reads any"),
        ("kubernetes.yaml", "3 groups (3 with a service), vnodes 160, reads any"),
    ],
)
def test_example_configs_are_valid(name: str, summary: str) -> None:
    path = str(ROOT / "config" / name)
    io_ = Streams()
    assert offline.validate(path, io_.out, io_.err) == 0, io_.err_lines
    assert io_.out_lines[0].startswith(f"OK {path}: {summary}, epoch ")


def test_local_example_matches_the_demo_layout() -> None:
    config = offline.load(str(ROOT / "config" / "local.yaml"))
    assert [g.name for g in config.groups] == ["group-1", "group-2", "group-3"]
    ports = [port for g in config.groups for _, port in g.addresses]
    assert ports == list(range(18081, 18087))
    assert config.routing.reads == "any"


def test_kubernetes_example_uses_services() -> None:
    config = offline.load(str(ROOT / "config" / "kubernetes.yaml"))
    assert [(g.service, g.port) for g in config.groups] == [
        (f"data-writer-group-{i}", "http") for i in (1, 2, 3)
    ]


# ---------------------------------------------------------------------------------------------
# route


def test_route_prints_the_recipe_owner(tmp_path: Path) -> None:
    doc = config_doc([("group-1", 1), ("group-2", 3), ("group-3", 2)], vnodes=50)
    path = write(tmp_path, "shards.yaml", doc)
    keys = [f"user-{i}" for i in range(300)] + ["用户", "a b"]
    io_ = Streams()
    assert offline.route(path, keys, io_.out, io_.err) == 0
    reference = recipe(parse_shard_config(yaml.safe_dump(doc)))
    assert io_.out_lines == [f"{key}\t{reference.get_node(key)}" for key in keys]


def test_route_strips_surrounding_whitespace(tmp_path: Path) -> None:
    path = write(tmp_path, "shards.yaml", config_doc(THREE))
    io_ = Streams()
    assert offline.route(path, ["  alice\t", "alice"], io_.out, io_.err) == 0
    first, second = io_.out_lines
    assert first == second and first.startswith("alice\t")


def test_route_reports_invalid_keys_and_continues(tmp_path: Path) -> None:
    path = write(tmp_path, "shards.yaml", config_doc(THREE))
    io_ = Streams()
    keys = ["ok", "", "x" * 257, "bad\x01", "\udcff", "\ud800"]
    assert offline.route(path, keys, io_.out, io_.err) == 1
    assert [line.split("\t")[0] for line in io_.out_lines] == ["ok"]
    assert io_.err_lines == [
        "'': missing_shard_key: the key is empty",
        f"'{'x' * 257}': invalid_shard_key: shard key is longer than 256 bytes",
        "'bad\\x01': invalid_shard_key: shard key contains control characters",
        "'\\udcff': invalid_shard_key: shard key is not valid UTF-8",
        "'\\ud800': invalid_shard_key: shard key is not valid UTF-8",
    ]


def test_route_with_an_invalid_config(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "version: 1\ngroups: []\n")
    io_ = Streams()
    assert offline.route(path, ["alice"], io_.out, io_.err) == 1
    assert io_.out_lines == []
    assert io_.err_lines == [f"{path}: groups: at least one group is required"]


# ---------------------------------------------------------------------------------------------
# plan


def configs(*docs: dict[str, Any]) -> list[ShardConfig]:
    return [parse_shard_config(yaml.safe_dump(doc)) for doc in docs]


def test_continuum_owner_matches_uhashring() -> None:
    (config,) = configs(config_doc([("a", 1), ("b", 2), ("c", 3)], vnodes=30))
    continuum, reference = offline.Continuum.of(config), recipe(config)
    rng = random.Random(3)
    keys = [f"k{rng.random()}" for _ in range(3000)]
    assert all(continuum.owner_at(reference.get_key(k)) == reference.get_node(k) for k in keys)
    # Exact positions, through uhashring's own lookup with the hash function bypassed.
    reference.hashi = lambda position: position
    first, last = continuum.positions[0], continuum.positions[-1]
    edges = [0, first - 1, first, first + 1, last - 1, last, 2**32 - 1, *continuum.positions[100:110]]
    assert [continuum.owner_at(h) for h in edges] == [reference.get_node(h) for h in edges]
    assert continuum.owner_at(last) == continuum.names[0]


def test_movement_widths_cover_the_hash_space() -> None:
    old, new = configs(config_doc(THREE), config_doc([("group-1", 2), ("group-2", 1), ("group-9", 1)]))
    widths = offline.movement(old, new)
    assert sum(widths.values()) == 2**32
    assert all(width > 0 for width in widths.values())


def test_adding_a_fourth_group_moves_a_quarter_to_it() -> None:
    old, new = configs(config_doc(THREE), config_doc(FOUR))
    widths = offline.movement(old, new)
    moved = {pair: w for pair, w in widths.items() if pair[0] != pair[1]}
    assert {dst for _, dst in moved} == {"group-4"}
    assert {src for src, _ in moved} == {"group-1", "group-2", "group-3"}
    assert offline.moved_fraction(widths) == pytest.approx(0.25, abs=0.04)


def test_plan_fractions_match_sampled_keys() -> None:
    old, new = configs(config_doc([("a", 1), ("b", 2)]), config_doc([("a", 1), ("b", 2), ("c", 1)]))
    widths = offline.movement(old, new)
    before, after = recipe(old), recipe(new)
    keys = [f"user-{i}" for i in range(20000)]
    sampled: dict[tuple[str, str], int] = {}
    for key in keys:
        pair = (before.get_node(key), after.get_node(key))
        sampled[pair] = sampled.get(pair, 0) + 1
    assert set(sampled) <= set(widths)
    for pair, width in widths.items():
        assert sampled.get(pair, 0) / len(keys) == pytest.approx(width / 2**32, abs=0.01)


def test_removing_a_group_moves_only_its_keys() -> None:
    old, new = configs(config_doc(FOUR), config_doc(THREE))
    widths = offline.movement(old, new)
    assert {src for src, dst in widths if src != dst} == {"group-4"}
    assert offline.moved_fraction(widths) == pytest.approx(0.25, abs=0.04)


def test_plan_output(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", config_doc(THREE))
    new = write(tmp_path, "new.yaml", config_doc(FOUR))
    io_ = Streams()
    assert offline.plan(old, new, io_.out, io_.err) == 0
    old_config, new_config = configs(config_doc(THREE), config_doc(FOUR))
    lines = io_.out_lines
    assert lines[0] == f"old epoch {config_epoch(old_config)}  {old} (3 groups)"
    assert lines[1] == f"new epoch {config_epoch(new_config)}  {new} (4 groups)"
    assert lines[2].split() == ["from", "to", "fraction"]
    rows = [line.split() for line in lines[3:6]]
    assert sorted(row[0] for row in rows) == ["group-1", "group-2", "group-3"]
    assert {row[1] for row in rows} == {"group-4"}
    total = sum(float(row[2]) for row in rows)
    assert re.fullmatch(r"moved 0\.\d{6} of the key space \(\d+\.\d\d%\)", lines[6])
    assert float(lines[6].split()[1]) == pytest.approx(total, abs=2e-6)
    assert len(lines) == 7 and io_.err_lines == []


def test_plan_without_changes(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", config_doc(THREE))
    new = write(tmp_path, "new.yaml", config_doc(THREE, reads="owner"))
    io_ = Streams()
    assert offline.plan(old, new, io_.out, io_.err) == 0
    assert io_.out_lines[2:] == ["no key moves"]
    assert io_.out_lines[0].split()[2] != io_.out_lines[1].split()[2]


def test_plan_with_an_invalid_config(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", config_doc(THREE))
    new = write(tmp_path, "new.yaml", "version: 3\ngroups: [{name: g, endpoints: ['h:1']}]\n")
    io_ = Streams()
    assert offline.plan(old, new, io_.out, io_.err) == 1
    assert io_.out_lines == []
    assert io_.err_lines == [f"{new}: version: Input should be 1"]


# ---------------------------------------------------------------------------------------------
# argparse front end


def test_main_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "shards.yaml", config_doc(THREE))
    assert cli.main(["validate", path]) == 0
    assert capsys.readouterr().out.startswith(f"OK {path}: 3 groups")


def test_main_route_and_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = write(tmp_path, "old.yaml", config_doc(THREE))
    new = write(tmp_path, "new.yaml", config_doc(FOUR))
    assert cli.main(["route", "--config", old, "alice", "bob"]) == 0
    owner = recipe(configs(config_doc(THREE))[0])
    assert capsys.readouterr().out.splitlines() == [
        f"alice\t{owner.get_node('alice')}",
        f"bob\t{owner.get_node('bob')}",
    ]
    assert cli.main(["plan", old, new]) == 0
    assert "group-4" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["validate"], ["route", "alice"], ["route", "--config", "x.yaml"], ["plan", "a"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: shardgate" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("run", "demo", "validate", "route", "plan"))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SHARDGATE_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def fake_app(clean_env: pytest.MonkeyPatch) -> Iterator[list[Settings]]:
    """Stands in for gateway.app (the data plane), recording the settings it is started with."""
    started: list[Settings] = []

    def run_gateway(settings: Settings) -> int:
        started.append(settings)
        return 0

    clean_env.setitem(sys.modules, "gateway.app", types.SimpleNamespace(run_gateway=run_gateway))
    root = logging.getLogger()
    level = root.level
    yield started
    root.setLevel(level)


def test_run_builds_settings_with_flags_over_env(
    fake_app: list[Settings], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("SHARDGATE_LISTEN", "0.0.0.0:1")
    clean_env.setenv("SHARDGATE_NAMESPACE", "from-env")
    clean_env.setenv("SHARDGATE_WORKERS", "2")
    argv = [
        "run",
        "--config",
        "shards.yaml",
        "--listen",
        "127.0.0.1:8081",
        "--admin-listen",
        "127.0.0.1:9091",
    ]
    assert cli.main([*argv, "--log-level", "debug"]) == 0
    (settings,) = fake_app
    assert settings.config_path == "shards.yaml"
    assert settings.listen == ("127.0.0.1", 8081)
    assert settings.admin_listen == ("127.0.0.1", 9091)
    assert settings.namespace == "from-env"
    assert settings.workers == 2
    assert logging.getLogger().level == logging.DEBUG


def test_run_with_configmap_and_workers(fake_app: list[Settings]) -> None:
    assert cli.main(["run", "--configmap", "shards", "--namespace", "prod", "--workers", "3"]) == 0
    (settings,) = fake_app
    assert (settings.configmap, settings.namespace, settings.workers) == ("shards", "prod", 3)


def test_run_log_level_from_env(fake_app: list[Settings], clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SHARDGATE_LOG_LEVEL", "warning")
    clean_env.setenv("SHARDGATE_CONFIG", "shards.yaml")
    assert cli.main(["run"]) == 0
    assert logging.getLogger().level == logging.WARNING
    assert fake_app[0].config_path == "shards.yaml"


def test_run_returns_the_gateway_exit_code(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setitem(sys.modules, "gateway.app", types.SimpleNamespace(run_gateway=lambda settings: 3))
    level = logging.getLogger().level
    try:
        assert cli.main(["run", "--config", "x.yaml"]) == 3
    finally:
        logging.getLogger().setLevel(level)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["run"], {}, "shardgate run: config: one of --config (SHARDGATE_CONFIG) or --configmap"),
        (
            ["run", "--config", "a", "--listen", "nowhere"],
            {},
            "shardgate run: SHARDGATE_LISTEN: 'nowhere' is not",
        ),
        (
            ["run"],
            {"SHARDGATE_CONFIG": "a", "SHARDGATE_CONFIGMAP": "c"},
            "shardgate run: config: give either",
        ),
        (
            ["run", "--config", "a", "--workers", "0"],
            {},
            "shardgate run: SHARDGATE_WORKERS: must be at least 1",
        ),
        (
            ["run", "--config", "a", "--log-level", "loud"],
            {},
            "shardgate run: SHARDGATE_LOG_LEVEL: 'LOUD' is not",
        ),
        (  # the standard OTEL_* variables are checked before anything starts, like ours
            ["run", "--config", "a"],
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318", "OTEL_TRACES_SAMPLER_ARG": "often"},
            "shardgate run: OTEL_TRACES_SAMPLER_ARG: 'often' is not a number",
        ),
        (
            ["run", "--config", "a"],
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            "shardgate run: OTEL_TRACES_EXPORTER: 'zipkin' is not",
        ),
    ],
)
def test_run_config_errors_exit_2(
    argv: list[str],
    env: dict[str, str],
    expected: str,
    fake_app: list[Settings],
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert fake_app == []


def test_run_config_and_configmap_flags_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--config", "a", "--configmap", "b"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_demo_passes_its_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, str | None]] = []

    def demo_main(**kwargs: str | None) -> int:
        calls.append(kwargs)
        return 0

    monkeypatch.setitem(sys.modules, "gateway.demo", types.SimpleNamespace(main=demo_main))
    assert cli.main(["demo", "--listen", "127.0.0.1:8000"]) == 0
    assert cli.main(["demo", "--admin-listen", "127.0.0.1:9999"]) == 0
    assert calls == [
        {"listen": "127.0.0.1:8000", "admin_listen": None},
        {"listen": None, "admin_listen": "127.0.0.1:9999"},
    ]


def test_python_m_gateway_validate() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", "config/local.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK config/local.yaml: 3 groups (3 with endpoints)")
    assert result.stderr == ""


def test_run_accepts_the_drain_flags() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--config", "c.yaml", "--drain-delay", "1.5", "--grace-timeout", "8"]
    )
    assert (args.drain_delay, args.grace_timeout) == (1.5, 8.0)
