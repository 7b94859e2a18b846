"""Process settings: flags over SHARDGATE_* variables over the model's defaults, every problem at once."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.config import ConfigError
from gateway.ipc import TO_WORKER, Start
from gateway.limits import Limits
from gateway.settings import Settings, default_text, env_name, load_settings


@pytest.fixture(autouse=True)
def service_account_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No SHARDGATE_* variable but a test's own, and a service-account directory without
    files (outside a pod) that a test may fill."""
    for name in list(os.environ):
        if name.startswith("SHARDGATE_"):
            monkeypatch.delenv(name)
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    monkeypatch.setenv("SHARDGATE_SERVICE_ACCOUNT_DIR", str(directory))
    return directory


def settings_from(*, env: Mapping[str, str], **flags: Any) -> Settings:
    """``load_settings(**flags)`` with the variables ``env`` set (and only while it runs)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        return load_settings(**flags)


def settings_problems(**kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from(**kwargs)
    return caught.value.problems


def test_settings_defaults() -> None:
    settings = settings_from(config_path="shards.yaml", env={})
    assert settings.config_path == "shards.yaml"
    assert settings.configmap is None
    assert settings.namespace == "default"
    assert settings.listen == ("0.0.0.0", 8080)
    assert settings.admin_listen == ("0.0.0.0", 9090)
    assert settings.workers == 1
    assert (settings.drain_delay, settings.grace_timeout) == (5.0, 20.0)
    assert settings.limits == Limits()


def test_settings_from_environment() -> None:
    env = {
        "SHARDGATE_CONFIGMAP": "shards",
        "SHARDGATE_NAMESPACE": "prod",
        "SHARDGATE_LISTEN": "127.0.0.1:8000",
        "SHARDGATE_ADMIN_LISTEN": "[::1]:9000",
        "SHARDGATE_WORKERS": "4",
        "SHARDGATE_DRAIN_DELAY": "0.5",
        "SHARDGATE_GRACE_TIMEOUT": "3",
        "SHARDGATE_MAX_BODY_BYTES": "1024",
        "SHARDGATE_CONNECT_TIMEOUT": "0.25",
    }
    settings = settings_from(env=env)
    assert settings.configmap == "shards"
    assert settings.config_path is None
    assert settings.namespace == "prod"
    assert settings.listen == ("127.0.0.1", 8000)
    assert settings.admin_listen == ("::1", 9000)
    assert settings.workers == 4
    assert (settings.drain_delay, settings.grace_timeout) == (0.5, 3.0)
    assert settings.limits.max_body_bytes == 1024
    assert settings.limits.connect_timeout == 0.25


def test_flags_win_over_environment() -> None:
    env = {
        "SHARDGATE_CONFIG": "env.yaml",
        "SHARDGATE_NAMESPACE": "env-ns",
        "SHARDGATE_LISTEN": "not an address",
        "SHARDGATE_ADMIN_LISTEN": "10.0.0.1:1",
        "SHARDGATE_WORKERS": "not a number",
    }
    settings = settings_from(
        config_path="flag.yaml",
        namespace="flag-ns",
        listen="127.0.0.1:1234",
        admin_listen="127.0.0.1:4321",
        workers=3,
        env=env,
    )
    assert settings.config_path == "flag.yaml"
    assert settings.namespace == "flag-ns"
    assert settings.listen == ("127.0.0.1", 1234)
    assert settings.admin_listen == ("127.0.0.1", 4321)
    assert settings.workers == 3


def test_empty_environment_values_mean_unset() -> None:
    env = {
        "SHARDGATE_CONFIG": "a.yaml",
        "SHARDGATE_CONFIGMAP": "",
        "SHARDGATE_WORKERS": "",
        "SHARDGATE_LISTEN": "",
    }
    settings = settings_from(env=env)
    assert (settings.config_path, settings.configmap, settings.workers) == ("a.yaml", None, 1)
    assert settings.listen == ("0.0.0.0", 8080)


def test_pod_namespace_is_the_default_in_a_cluster(service_account_dir: Path) -> None:
    (service_account_dir / "namespace").write_text("team-a\n")
    assert settings_from(config_path="a.yaml", env={}).namespace == "team-a"
    assert settings_from(config_path="a.yaml", env={"SHARDGATE_NAMESPACE": "b"}).namespace == "b"


def test_a_config_source_is_required() -> None:
    assert settings_problems(env={}) == [
        "config: one of --config (SHARDGATE_CONFIG) or --configmap (SHARDGATE_CONFIGMAP)"
    ]


def test_only_one_config_source() -> None:
    expected = ["config: give either --config or --configmap, not both"]
    assert settings_problems(config_path="a.yaml", configmap="shards", env={}) == expected
    assert settings_problems(env={"SHARDGATE_CONFIG": "a.yaml", "SHARDGATE_CONFIGMAP": "s"}) == expected


@pytest.mark.parametrize(
    ("kwargs", "env", "expected"),
    [
        ({"listen": "8080"}, {}, "SHARDGATE_LISTEN: '8080' is not host:port"),
        ({}, {"SHARDGATE_LISTEN": "0.0.0.0:99999"}, "SHARDGATE_LISTEN: '0.0.0.0:99999' has an invalid port"),
        ({"admin_listen": "host"}, {}, "SHARDGATE_ADMIN_LISTEN: 'host' is not host:port"),
        ({"workers": 0}, {}, "SHARDGATE_WORKERS: must be at least 1"),
        ({}, {"SHARDGATE_WORKERS": "0"}, "SHARDGATE_WORKERS: must be at least 1"),
        ({}, {"SHARDGATE_WORKERS": "two"}, "SHARDGATE_WORKERS: 'two' is not a non-negative integer"),
        ({}, {"SHARDGATE_WORKERS": "-2"}, "SHARDGATE_WORKERS: must be at least 1"),
        ({}, {"SHARDGATE_DRAIN_DELAY": "soon"}, "SHARDGATE_DRAIN_DELAY: 'soon' is not a number"),
        ({}, {"SHARDGATE_GRACE_TIMEOUT": "-1"}, "SHARDGATE_GRACE_TIMEOUT: must not be negative"),
        ({}, {"SHARDGATE_MAX_HEADER_BYTES": "1k"}, "SHARDGATE_MAX_HEADER_BYTES: '1k' is not a non-negative"),
    ],
)
def test_settings_errors(kwargs: dict[str, Any], env: dict[str, str], expected: str) -> None:
    found = settings_problems(config_path="a.yaml", env=env, **kwargs)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_settings_errors_are_collected() -> None:
    found = settings_problems(listen="x", admin_listen="y", env={"SHARDGATE_WORKERS": "0"})
    assert [p.split(":", 1)[0] for p in found] == [
        "config",
        "SHARDGATE_LISTEN",
        "SHARDGATE_ADMIN_LISTEN",
        "SHARDGATE_WORKERS",
    ]


def test_unicode_digits_in_an_integer_variable_are_a_config_error() -> None:
    assert settings_problems(config_path="a.yaml", env={"SHARDGATE_WORKERS": "\u00b2"})


def test_a_source_flag_overrides_both_source_variables() -> None:
    env = {"SHARDGATE_CONFIG": "file.yaml", "SHARDGATE_CONFIGMAP": "shards"}
    settings = settings_from(configmap="other", env=env)
    assert (settings.config_path, settings.configmap) == (None, "other")
    settings = settings_from(config_path="mine.yaml", env=env)
    assert (settings.config_path, settings.configmap) == ("mine.yaml", None)


def test_drain_settings_come_from_flags_before_the_environment() -> None:
    env = {"SHARDGATE_CONFIG": "c.yaml", "SHARDGATE_DRAIN_DELAY": "7", "SHARDGATE_GRACE_TIMEOUT": "9"}
    from_env = settings_from(env=env)
    assert (from_env.drain_delay, from_env.grace_timeout) == (7.0, 9.0)
    from_flags = settings_from(drain_delay=0.5, grace_timeout=3, env=env)
    assert (from_flags.drain_delay, from_flags.grace_timeout) == (0.5, 3.0)
    with pytest.raises(ConfigError) as info:
        settings_from(drain_delay=-1, env=env)
    assert info.value.problems == ["SHARDGATE_DRAIN_DELAY: must not be negative"]


# ---------------------------------------------------------------------------------------------
# One place for each default: the model. The README's and the contract's tables and the CLI help
# agree with it.

ROOT = Path(__file__).resolve().parents[2]
ENV_NAME = re.compile(r"`(SHARDGATE_[A-Z0-9_]+)`")


def documented_variables(document: Path) -> dict[str, str]:
    """Each SHARDGATE_* variable in a table row of ``document`` -> the text of its default cell."""
    found: dict[str, str] = {}
    for line in document.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        for i, cell in enumerate(cells[:-1]):
            names = ENV_NAME.findall(cell)
            if names and cell.startswith("`SHARDGATE_"):
                for name in names:
                    found.setdefault(name, cells[i + 1] if len(names) == 1 else "")
                break
    return found


@pytest.mark.parametrize("document", ["README.md", "docs/contract.md"])
def test_the_docs_give_every_variable_with_the_models_default(document: str) -> None:
    documented = documented_variables(ROOT / document)
    fields = {env_name(field): field for field in Settings.model_fields}
    assert set(documented) == set(fields), f"{document} and the model disagree on the variables"
    compared = 0
    for name, cell in documented.items():
        default = default_text(fields[name])
        shown = re.match(r"`([^`]+)`", cell)
        if default is None:
            assert shown is None or "SHARDGATE_" in shown.group(1), f"{name}: {document} shows a default"
            continue
        assert shown is not None and shown.group(1) == default, f"{name}: {document} {cell!r} ({default})"
        compared += 1
    assert compared >= 20


def test_the_run_flags_help_names_the_variable_and_the_models_default() -> None:
    parser = cli.build_parser()
    run = next(
        action.choices["run"] for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    helps = {opt: action.help or "" for action in run._actions for opt in action.option_strings}
    flags = {
        "--config": "config_path",
        "--configmap": "configmap",
        "--listen": "listen",
        "--admin-listen": "admin_listen",
        "--workers": "workers",
        "--drain-delay": "drain_delay",
        "--grace-timeout": "grace_timeout",
        "--log-level": "log_level",
    }
    for flag, field in flags.items():
        default = default_text(field)
        expected = f"({env_name(field)}" + (f", default {default})" if default is not None else ")")
        assert helps[flag].endswith(expected), (flag, helps[flag])
    assert "--grace-timeout" in helps and "default 20)" in helps["--grace-timeout"]


def test_settings_reach_a_worker_whole_without_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the supervisor sends in the start message is what the worker runs with, whatever
    SHARDGATE_* variables the worker's own environment holds."""
    monkeypatch.setenv("SHARDGATE_GRACE_TIMEOUT", "3")
    monkeypatch.setenv("SHARDGATE_MAX_BODY_BYTES", "1024")
    sent = load_settings(config_path="a.yaml", grace_timeout=7, listen="127.0.0.1:8123")
    assert (sent.grace_timeout, sent.max_body_bytes) == (7.0, 1024)
    monkeypatch.setenv("SHARDGATE_GRACE_TIMEOUT", "11")
    monkeypatch.setenv("SHARDGATE_MAX_BODY_BYTES", "99")
    monkeypatch.setenv("SHARDGATE_WORKERS", "not a number")
    message = Start(index=1, settings=sent)
    received = TO_WORKER.validate_json(message.encode())
    assert isinstance(received, Start) and received.settings == sent
    assert received.settings.limits == sent.limits and received.settings.limits.max_body_bytes == 1024
