"""Shard config validation (every rule, with its field path)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from gateway.config import (
    ConfigError,
    load_shard_config,
    parse_host_port,
    parse_shard_config,
)

BASE: dict[str, Any] = {
    "version": 1,
    "groups": [
        {"name": "group-1", "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"]},
        {"name": "group-2", "service": "data-writer-group-2", "port": "http"},
    ],
}


def document(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc.update(changes)
    return doc


def with_group(index: int, **fields: Any) -> dict[str, Any]:
    doc = document()
    group = doc["groups"][index]
    for name, value in fields.items():
        if value is None:
            group.pop(name, None)
        else:
            group[name] = value
    return doc


def problems(doc: dict[str, Any] | str) -> list[str]:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    with pytest.raises(ConfigError) as caught:
        parse_shard_config(text)
    assert str(caught.value) == "; ".join(caught.value.problems)
    return caught.value.problems


def only_problem(doc: dict[str, Any] | str) -> str:
    found = problems(doc)
    assert len(found) == 1, found
    return found[0]


# ---------------------------------------------------------------------------------------------
# valid documents and defaults


def test_minimal_document_gets_the_contract_defaults() -> None:
    config = parse_shard_config("version: 1\ngroups:\n  - {name: g1, endpoints: ['h:1']}\n")
    routing = config.routing
    assert routing.key_header == "User-ID"
    assert set(routing.write_methods) == {"DELETE", "PATCH", "POST", "PUT"}
    assert routing.operation_header == "Operation-Type"
    assert routing.missing_key == "reject"
    assert routing.reads == "any"
    assert config.ring.vnodes == 160
    assert config.groups[0].weight == 1


def test_full_document_from_the_contract_parses() -> None:
    text = """
version: 1
routing:
  key_header: User-ID
  write_methods: [POST, PUT, PATCH, DELETE]
  operation_header: Operation-Type
  missing_key: reject
  reads: owner-preferred
ring:
  vnodes: 160
groups:
  - name: group-1
    weight: 1
    service: data-writer-group-1
    port: http
  - name: group-2
    endpoints: ["127.0.0.1:9003", "127.0.0.1:9004"]
"""
    config = parse_shard_config(text)
    assert [g.name for g in config.groups] == ["group-1", "group-2"]
    assert config.groups[1].addresses == (("127.0.0.1", 9003), ("127.0.0.1", 9004))
    assert config.routing.reads == "owner-preferred"


def test_default_write_methods_are_normalized_like_explicit_ones() -> None:
    implicit = parse_shard_config("version: 1\ngroups: [{name: g1, endpoints: ['h:1']}]\n")
    explicit = parse_shard_config(
        "version: 1\nrouting: {write_methods: [POST, PUT, PATCH, DELETE]}\n"
        "groups: [{name: g1, endpoints: ['h:1']}]\n"
    )
    assert implicit.routing.write_methods == explicit.routing.write_methods


def test_bytes_input_is_accepted() -> None:
    assert parse_shard_config(yaml.safe_dump(BASE).encode()).groups[0].name == "group-1"


def test_operation_header_may_be_disabled() -> None:
    config = parse_shard_config(yaml.safe_dump(document(routing={"operation_header": None})))
    assert config.routing.operation_header is None


def test_write_methods_are_deduplicated_and_sorted() -> None:
    config = parse_shard_config(yaml.safe_dump(document(routing={"write_methods": ["PUT", "POST", "PUT"]})))
    assert config.routing.write_methods == ("POST", "PUT")


@pytest.mark.parametrize("port", [8080, "http", "grpc-web", 1, 65535])
def test_service_port_by_name_or_number(port: int | str) -> None:
    config = parse_shard_config(yaml.safe_dump(with_group(1, port=port)))
    assert config.groups[1].port == port


def test_service_group_without_port_is_allowed() -> None:
    assert parse_shard_config(yaml.safe_dump(with_group(1, port=None))).groups[1].port is None


# ---------------------------------------------------------------------------------------------
# groups


def test_group_names_must_be_unique() -> None:
    doc = document()
    doc["groups"][1]["name"] = "group-1"
    assert only_problem(doc) == "groups: group name 'group-1' is used more than once"


def test_at_least_one_group() -> None:
    assert only_problem(document(groups=[])) == "groups: at least one group is required"


def test_groups_are_required() -> None:
    assert only_problem({"version": 1}) == "groups: Field required"


@pytest.mark.parametrize(
    ("weight", "reason"),
    [
        (0, "Input should be greater than or equal to 1"),
        (-3, "Input should be greater than or equal to 1"),
        (1001, "Input should be less than or equal to 1000"),
        (1.5, "Input should be a valid integer"),
        ("heavy", "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
    ],
)
def test_weight_bounds(weight: object, reason: str) -> None:
    assert only_problem(with_group(1, weight=weight)) == f"groups.1.weight: {reason}"


@pytest.mark.parametrize("weight", [1, 7, 1000])
def test_weight_accepted(weight: int) -> None:
    assert parse_shard_config(yaml.safe_dump(with_group(0, weight=weight))).groups[0].weight == weight


def test_group_with_neither_service_nor_endpoints() -> None:
    problem = only_problem(with_group(0, endpoints=None))
    assert problem == "groups.0: a group needs exactly one of 'service' or 'endpoints'"


def test_group_with_both_service_and_endpoints() -> None:
    problem = only_problem(with_group(1, endpoints=["10.0.0.1:80"]))
    assert problem == "groups.1: a group needs exactly one of 'service' or 'endpoints'"


def test_port_belongs_to_service_groups() -> None:
    problem = only_problem(with_group(0, port=80))
    assert problem == "groups.0: 'port' belongs to 'service' groups; endpoints carry their own ports"


@pytest.mark.parametrize(
    "name", ["-group", "group-", "group 1", "gr/oup", "", "a" * 64, "grüppe", "group-1.", "_g"]
)
def test_bad_group_names(name: str) -> None:
    problem = only_problem(with_group(0, name=name))
    assert problem.startswith(f"groups.0.name: {name!r} is not a valid group name")


@pytest.mark.parametrize("name", ["g", "G1", "group-1", "shard_01.eu", "a" * 63])
def test_good_group_names(name: str) -> None:
    assert parse_shard_config(yaml.safe_dump(with_group(0, name=name))).groups[0].name == name


@pytest.mark.parametrize("service", ["Data-Writer", "data_writer", "-svc", "svc-", "a" * 64, "1.2"])
def test_bad_service_names(service: str) -> None:
    problem = only_problem(with_group(1, service=service))
    assert problem == f"groups.1.service: {service!r} is not a valid Service name (DNS-1035 label)"


@pytest.mark.parametrize("port", ["HTTP", "my_port", "-http", "a" * 16])
def test_bad_port_names(port: str) -> None:
    assert only_problem(with_group(1, port=port)) == (
        f"groups.1.port: {port!r} is not a valid port name (IANA_SVC_NAME)"
    )


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_service_port_numbers_out_of_range(port: int) -> None:
    assert only_problem(with_group(1, port=port)) == f"groups.1.port: port {port} is out of range (1-65535)"


# ---------------------------------------------------------------------------------------------
# host:port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9001", ("127.0.0.1", 9001)),
        ("localhost:1", ("localhost", 1)),
        ("db-1.shard.svc.cluster.local:65535", ("db-1.shard.svc.cluster.local", 65535)),
        ("[::1]:8080", ("::1", 8080)),
        ("[fe80::1:2]:443", ("fe80::1:2", 443)),
        ("[::ffff:10.0.0.1]:80", ("::ffff:10.0.0.1", 80)),
    ],
)
def test_parse_host_port_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost", "is not host:port"),
        (":8080", "is not host:port"),
        ("host:", "has an invalid port ''"),
        ("host:0", "has an invalid port '0'"),
        ("host:65536", "has an invalid port '65536'"),
        ("host:-1", "has an invalid port '-1'"),
        ("host:http", "has an invalid port 'http'"),
        ("host:80 ", "has an invalid port '80 '"),
        ("::1:8080", "has an invalid host '::1'"),
        ("[::1]", "has an invalid host '[:'"),
        ("[::1:8080", "has an invalid host '[::1'"),
        ("[fe80::zz]:80", "has an invalid host '[fe80::zz]'"),
        ("-host:80", "has an invalid host '-host'"),
        ("host-:80", "has an invalid host 'host-'"),
        ("a b:80", "has an invalid host 'a b'"),
        ("http://host:80", "has an invalid host 'http://host'"),
    ],
)
def test_parse_host_port_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_host_port(text)
    assert str(caught.value) == f"{text!r} {reason}" + (" (1-65535)" if "invalid port" in reason else "")


@pytest.mark.parametrize("endpoint", ["host:0", "host:70000", "::1:80", "[::1]", "nohost", "[::1]:http"])
def test_bad_endpoints_are_reported_on_the_group(endpoint: str) -> None:
    problem = only_problem(with_group(0, endpoints=["127.0.0.1:9001", endpoint]))
    assert problem.startswith(f"groups.0.endpoints: {endpoint!r} ")


def test_ipv6_endpoints_are_accepted() -> None:
    config = parse_shard_config(yaml.safe_dump(with_group(0, endpoints=["[::1]:9001", "[2001:db8::7]:80"])))
    assert config.groups[0].addresses == (("::1", 9001), ("2001:db8::7", 80))


def test_endpoints_must_not_be_empty() -> None:
    assert only_problem(with_group(0, endpoints=[])) == (
        "groups.0.endpoints: endpoints must list at least one host:port"
    )


def test_endpoints_must_not_repeat() -> None:
    assert only_problem(with_group(0, endpoints=["h:1", "h:1"])) == (
        "groups.0.endpoints: endpoints must not repeat an address"
    )


def test_endpoint_of_the_wrong_type() -> None:
    assert (
        only_problem(with_group(0, endpoints=[8080]))
        == "groups.0.endpoints.0: Input should be a valid string"
    )


@pytest.mark.parametrize("text", ["host:\uff18\uff10", "host:\u00b2"])
def test_unicode_digits_are_not_a_port(text: str) -> None:
    with pytest.raises(ValueError, match="has an invalid port"):
        parse_host_port(text)


@pytest.mark.parametrize("text", ["[1.2.3.4]:80", "[:]:80", "[...]:80"])
def test_brackets_hold_an_ipv6_address(text: str) -> None:
    with pytest.raises(ValueError, match=r"has an invalid (host|IPv6 address)"):
        parse_host_port(text)


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("method", ["PO ST", "GET/1", "", "P\u00d6ST", "(POST)"])
def test_bad_method_names(method: str) -> None:
    problem = only_problem(document(routing={"write_methods": ["POST", method]}))
    assert problem == (
        f"routing.write_methods: {method!r} is not a valid method name (RFC 9110 token characters only)"
    )


def test_methods_must_be_upper_case() -> None:
    assert only_problem(document(routing={"write_methods": ["post"]})) == (
        "routing.write_methods: method 'post' must be upper case"
    )


def test_custom_token_methods_are_allowed() -> None:
    config = parse_shard_config(
        yaml.safe_dump(document(routing={"write_methods": ["PROPPATCH", "M-SEARCH"]}))
    )
    assert config.routing.write_methods == ("M-SEARCH", "PROPPATCH")


def test_at_least_one_write_method() -> None:
    assert only_problem(document(routing={"write_methods": []})) == (
        "routing.write_methods: at least one write method is required"
    )


@pytest.mark.parametrize("field", ["key_header", "operation_header"])
@pytest.mark.parametrize("name", ["User ID", "User:ID", "", "User-ID\u00e9", "X-(a)"])
def test_bad_header_names(field: str, name: str) -> None:
    assert only_problem(document(routing={field: name})) == (
        f"routing.{field}: {name!r} is not a valid header name (RFC 9110 token characters only)"
    )


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (document(routing={"key_header": "User-ID\n"}), "routing.key_header"),
        (document(routing={"write_methods": ["POST\n"]}), "routing.write_methods"),
        (with_group(0, name="group-1\n"), "groups.0.name"),
        (with_group(1, service="svc\n"), "groups.1.service"),
        (with_group(1, port="http\n"), "groups.1.port"),
        (with_group(0, endpoints=["host\n:80"]), "groups.0.endpoints"),
    ],
)
def test_a_trailing_newline_is_not_part_of_a_name(doc: dict[str, Any], path: str) -> None:
    assert only_problem(doc).startswith(f"{path}: ")


def test_reads_mode_must_be_known() -> None:
    assert only_problem(document(routing={"reads": "nearest"})) == (
        "routing.reads: Input should be 'any', 'owner' or 'owner-preferred'"
    )


def test_missing_key_policy_must_be_known() -> None:
    assert only_problem(document(routing={"missing_key": "any"})) == (
        "routing.missing_key: Input should be 'reject'"
    )


@pytest.mark.parametrize(
    ("vnodes", "reason"), [(0, "greater than or equal to 1"), (4097, "less than or equal to 4096")]
)
def test_vnodes_bounds(vnodes: int, reason: str) -> None:
    assert only_problem(document(ring={"vnodes": vnodes})) == f"ring.vnodes: Input should be {reason}"


# ---------------------------------------------------------------------------------------------
# document shape


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (document(shards=3), "shards"),
        (document(routing={"key-header": "User-ID"}), "routing.key-header"),
        (document(ring={"replicas": 4}), "ring.replicas"),
        (with_group(1, replicas=2), "groups.1.replicas"),
    ],
)
def test_unknown_keys_are_rejected(doc: dict[str, Any], path: str) -> None:
    assert only_problem(doc) == f"{path}: Extra inputs are not permitted"


@pytest.mark.parametrize("version", [2, 0, "one", None])
def test_version_must_be_1(version: object) -> None:
    assert only_problem(document(version=version)) == "version: Input should be 1"


def test_version_is_required() -> None:
    doc = document()
    del doc["version"]
    assert only_problem(doc) == "version: Field required"


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n", "42\n", "null\n"])
def test_document_must_be_a_mapping(text: str) -> None:
    assert only_problem(text) == "(document): the shard config must be a YAML mapping"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("version: 1\ngroups:\n  - name: [g1\n", "line 4, column 1"),
        ("version: 1\n\tgroups: []\n", "line 2, column 1"),
        ("version: 1\ngroups: {a: 1\n", "line 3, column 1"),
        ("version: 1\n---\nversion: 1\n", "line 2, column 1"),
        ("version: 1\ngroups: *nothing\n", "line 2, column 9"),
    ],
)
def test_invalid_yaml_is_reported_with_its_line(text: str, where: str) -> None:
    assert only_problem(text).startswith(f"{where}: invalid YAML: ")


def test_every_problem_is_reported_at_once() -> None:
    doc = {
        "version": 2,
        "routing": {"reads": "all", "write_methods": ["post"]},
        "ring": {"vnodes": 0},
        "groups": [
            {"name": "ok", "weight": 0, "endpoints": ["h:0"]},
            {"name": "bad name", "service": "svc"},
            {"name": "x", "service": "svc", "endpoints": ["h:1"]},
        ],
    }
    found = problems(doc)
    paths = sorted(problem.split(": ", 1)[0] for problem in found)
    assert paths == [
        "groups.0.endpoints",
        "groups.0.weight",
        "groups.1.name",
        "groups.2",
        "ring.vnodes",
        "routing.reads",
        "routing.write_methods",
        "version",
    ]


def test_load_shard_config_reads_a_file(tmp_path: Any) -> None:
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_shard_config(str(path)).groups[1].service == "data-writer-group-2"


def test_load_shard_config_reports_an_unreadable_file(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as caught:
        load_shard_config(missing)
    assert caught.value.problems == [f"{missing}: cannot read: No such file or directory"]


def test_config_is_immutable() -> None:
    config = parse_shard_config(yaml.safe_dump(BASE))
    with pytest.raises(ValueError):
        config.ring.vnodes = 7  # type: ignore[misc]


def test_duplicate_yaml_keys_are_rejected_not_silently_merged() -> None:
    text = "version: 1\ngroups:\n  - name: a\n    endpoints: ['h:1']\ngroups: []\n"
    with pytest.raises(ConfigError) as info:
        parse_shard_config(text)
    assert "duplicate key 'groups'" in info.value.problems[0]
    assert info.value.problems[0].startswith("line 5")


def test_one_endpoint_in_two_groups_is_rejected() -> None:
    text = (
        "version: 1\ngroups:\n  - name: a\n    endpoints: ['h:1', 'h:2']\n"
        "  - name: b\n    endpoints: ['h:2']\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_shard_config(text)
    assert info.value.problems == ["groups: endpoint h:2 is in both 'a' and 'b'"]


# ---------------------------------------------------------------------------------------------
# health (docs/contract.md "Health")


def test_health_left_out_means_the_defaults_and_the_epoch_of_before() -> None:
    from gateway.ring import config_epoch

    plain = parse_shard_config(yaml.safe_dump(document()))
    settings = plain.passive_health(plain.groups[0])
    assert (settings.enabled, settings.consecutive_5xx, settings.base_ejection, settings.max_ejection) == (
        True,
        5,
        30.0,
        300.0,
    )
    # Written out with the default values, the section is a change like any other field.
    given = parse_shard_config(yaml.safe_dump(document(health={"passive": {"consecutive_5xx": 5}})))
    assert config_epoch(plain) != config_epoch(given)
    assert "health" not in yaml.safe_dump(plain.model_dump(mode="json", exclude_none=True))


def test_a_group_changes_the_health_settings_it_names_and_keeps_the_rest() -> None:
    doc = with_group(0, health={"passive": {"consecutive_5xx": 10, "enabled": False}})
    doc["health"] = {"passive": {"base_ejection": 5, "max_ejection": 50}}
    config = parse_shard_config(yaml.safe_dump(doc))
    own, other = (config.passive_health(g) for g in config.groups)
    assert (own.enabled, own.consecutive_5xx, own.base_ejection, own.max_ejection) == (False, 10, 5.0, 50.0)
    assert (other.enabled, other.consecutive_5xx, other.base_ejection) == (True, 5, 5.0)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            document(health={"passive": {"base_ejection": 60, "max_ejection": 30}}),
            "health.passive: max_ejection must be at least base_ejection",
        ),
        (
            with_group(1, health={"passive": {"base_ejection": 600}}),
            "group 'group-2': health.passive: max_ejection must be at least base_ejection",
        ),
        (document(health={"passive": {"consecutive_5xx": 0}}), "health.passive.consecutive_5xx:"),
        (document(health={"active": {"path": "/healthz"}}), "health.active:"),
    ],
    ids=["cap-below-base", "group-override", "zero-run", "active-not-yet"],
)
def test_invalid_health_settings_are_reported_with_their_path(doc: dict[str, Any], expected: str) -> None:
    assert expected in only_problem(doc)
