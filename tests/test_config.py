"""Config loading: every ConfigError case names the field, defaults, flag overrides, the example file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from yarl import URL

from gateway.config import (
    Clients,
    Config,
    ConfigError,
    HealthCheck,
    Listen,
    Overrides,
    Route,
    Storage,
    Streams,
    Upstream,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config" / "gateway.yaml"


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None,
              overrides: Overrides = Overrides()) -> Config:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return load_config(str(path), overrides, env={} if env is None else env)


def config_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    return info.value


# --- one test per ConfigError case ----------------------------------------------------------------

def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = config_error(tmp_path, "listen: {port: 8080}\nlisten_port: 9000\n")
    assert err.field == "listen_port"
    assert err.value == 9000
    assert "known key" in str(err)


def test_unknown_nested_key(tmp_path: Path) -> None:
    err = config_error(tmp_path, "storage:\n  durabilty: none\n")
    assert err.field == "storage.durabilty"
    assert "durability" in err.expected  # the list of known keys shows the right spelling


def test_bad_duration(tmp_path: Path) -> None:
    err = config_error(tmp_path, "streams: {heartbeat: 15 seconds}\n")
    assert err.field == "streams.heartbeat"
    assert err.value == "15 seconds"
    assert "duration" in err.expected


def test_negative_or_zero_duration(tmp_path: Path) -> None:
    err = config_error(tmp_path, "upstreams: {default: {urls: [http://a:1], health: {interval: 0}}}\n")
    assert err.field == "upstreams.default.health.interval"
    assert "positive" in err.expected


def test_bad_size(tmp_path: Path) -> None:
    err = config_error(tmp_path, "storage: {max_bytes: 8 gigs}\n")
    assert err.field == "storage.max_bytes"
    assert err.value == "8 gigs"
    assert "size" in err.expected


def test_bad_url(tmp_path: Path) -> None:
    err = config_error(tmp_path, "upstreams:\n  default:\n    urls: [http://ok:2024, 'ftp://files:21']\n")
    assert err.field == "upstreams.default.urls[1]"
    assert err.value == "ftp://files:21"
    assert "http://" in err.expected


def test_url_without_host(tmp_path: Path) -> None:
    err = config_error(tmp_path, "upstreams: {default: 'http://'}\n")
    assert err.field == "upstreams.default.urls[0]"


def test_route_to_unknown_upstream(tmp_path: Path) -> None:
    err = config_error(tmp_path, (
        "upstreams: {default: http://a:1}\n"
        "routes:\n  - {prefix: /deployments/support, upstream: support}\n"))
    assert err.field == "routes[0].upstream"
    assert err.value == "support"
    assert "default" in err.expected  # lists the upstreams that do exist


def test_duplicate_route_prefix(tmp_path: Path) -> None:
    err = config_error(tmp_path, (
        "upstreams: {default: http://a:1, b: http://b:1}\n"
        "routes:\n"
        "  - {prefix: /deployments/b, upstream: b}\n"
        "  - {prefix: /deployments/b/, upstream: default}\n"))  # same prefix once the / is dropped
    assert err.field == "routes[1].prefix"
    assert err.value == "/deployments/b"


def test_route_prefix_with_placeholder(tmp_path: Path) -> None:
    err = config_error(tmp_path, (
        "upstreams: {default: http://a:1}\n"
        "routes:\n  - {prefix: '/deployments/{name}', upstream: default}\n"))
    assert err.field == "routes[0].prefix"


@pytest.mark.parametrize("port", ["70000", "-1", "http", "8080.5"])
def test_bad_port(tmp_path: Path, port: str) -> None:
    err = config_error(tmp_path, f"listen: {{port: {port}}}\n")
    assert err.field == "listen.port"
    assert "integer" in err.expected


def test_bad_admin_port(tmp_path: Path) -> None:
    err = config_error(tmp_path, "admin: {port: 65536}\n")
    assert err.field == "admin.port"
    assert err.value == 65536


def test_bad_durability(tmp_path: Path) -> None:
    err = config_error(tmp_path, "storage: {durability: sometimes}\n")
    assert err.field == "storage.durability"
    assert err.value == "sometimes"
    assert "fsync" in err.expected and "none" in err.expected


def test_missing_env_var(tmp_path: Path) -> None:
    err = config_error(tmp_path, "upstreams:\n  default:\n    urls: ['${AGENT_URL}']\n", env={})
    assert err.field == "upstreams.default.urls[0]"
    assert err.value == "${AGENT_URL}"
    assert "AGENT_URL" in err.expected


def test_empty_env_var_counts_as_missing(tmp_path: Path) -> None:
    err = config_error(tmp_path, "storage: {path: '${DATA}'}\n", env={"DATA": ""})
    assert err.field == "storage.path"


def test_env_default_expansion(tmp_path: Path) -> None:
    text = ("upstreams: {default: {urls: ['${UPSTREAM_URL:-http://127.0.0.1:2024}']}}\n"
            "storage: {path: '${GATEWAY_DATA_DIR:-./data}/log'}\n")
    unset = load_text(tmp_path, text, env={})
    assert unset.upstream("default").urls == (URL("http://127.0.0.1:2024"),)
    assert unset.storage.path == Path("data/log")
    empty = load_text(tmp_path, text, env={"UPSTREAM_URL": ""})  # empty is treated as unset
    assert empty.upstream("default").urls == (URL("http://127.0.0.1:2024"),)
    given = load_text(tmp_path, text, env={"UPSTREAM_URL": "https://agent.internal:8443/",
                                           "GATEWAY_DATA_DIR": "/data"})
    assert given.upstream("default").urls == (URL("https://agent.internal:8443"),)
    assert given.storage.path == Path("/data/log")


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    err = config_error(tmp_path, "listen:\n  port: 8080\n   host: [unclosed\n")
    assert err.field.endswith("gateway.yaml, line 3, column 8"), err.field
    assert "not valid YAML" in err.expected
    assert "unclosed" not in str(err), "the line's text is not echoed (it may hold a secret)"


def test_yaml_document_not_a_mapping(tmp_path: Path) -> None:
    err = config_error(tmp_path, "- just\n- a list\n")
    assert err.field == "<root>"


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path / "missing.yaml"))
    assert info.value.field == "--config"


def test_error_message_names_field_and_value(tmp_path: Path) -> None:
    err = config_error(tmp_path, "storage: {durability: sometimes}\n")
    assert str(err) == "storage.durability: 'fsync' or 'none' (got 'sometimes')"


def test_a_key_given_twice_is_refused_naming_the_line(tmp_path: Path) -> None:
    # YAML allows no duplicate key; PyYAML keeps the last one, so the first section vanished unsaid.
    err = config_error(tmp_path, "storage: {path: /data}\nlisten: {port: 1}\nstorage: {durability: none}\n")
    assert err.field.endswith("gateway.yaml, line 3, column 1"), err.field
    assert "storage" in err.expected and "twice" in err.expected


def test_a_nested_key_given_twice_is_refused(tmp_path: Path) -> None:
    err = config_error(tmp_path, "listen:\n  port: 1\n  port: 2\n")
    assert err.field.endswith("line 3, column 3"), err.field
    err = config_error(tmp_path, "listen: {port: 1, port: 2}\n")
    assert err.field.endswith("line 1, column 19"), err.field


@pytest.mark.parametrize("value", [".nan", ".inf", "'" + "9" * 400 + "s'"])
def test_a_duration_that_is_not_a_finite_number_is_refused(tmp_path: Path, value: str) -> None:
    # NaN compares false with everything: a NaN timeout fires at once (every upstream read a 504).
    err = config_error(tmp_path, f"upstreams: {{default: {{urls: [http://a:1], read_timeout: {value}}}}}\n")
    assert err.field == "upstreams.default.read_timeout"


@pytest.mark.parametrize("value", ["'" + "9" * 400 + "'", "'9999999999TiB'", str(1 << 64)])
def test_a_size_beyond_any_storage_is_refused(tmp_path: Path, value: str) -> None:
    err = config_error(tmp_path, f"storage: {{map_size: {value}}}\n")
    assert err.field == "storage.map_size"


@pytest.mark.parametrize("value", ["", "~", "null", "[a]", '"\\0data"'])
def test_a_storage_path_that_is_not_a_path_is_refused(tmp_path: Path, value: str) -> None:
    # `path:` left empty was the directory "None".
    err = config_error(tmp_path, f"storage:\n  path: {value}\n")
    assert err.field == "storage.path"


def test_an_alias_inside_the_node_it_names_is_a_config_error_not_a_recursion_error(tmp_path: Path) -> None:
    err = config_error(tmp_path, "upstreams: &u {default: {urls: [http://a:1], loop: *u}}\n")
    assert err.field.startswith("upstreams.default.loop") and "alias" in str(err)


def test_aliases_of_aliases_that_multiply_past_any_real_config_are_refused(tmp_path: Path) -> None:
    # Seven levels of ten: ten million values, seconds to expand. One level more took minutes.
    levels = ["a: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    err = config_error(tmp_path, "\n".join(levels) + "\n")
    assert "aliases" in str(err)


# --- defaults -------------------------------------------------------------------------------------

def test_defaults_without_a_file() -> None:
    cfg = load_config(None, env={})
    assert cfg.listen == Listen("127.0.0.1", 8080)
    assert cfg.admin == Listen("127.0.0.1", 8081)
    (up,) = cfg.upstreams
    assert up.name == "default"
    assert up.urls == (URL("http://127.0.0.1:2024"),)
    assert up.health == HealthCheck()
    assert (up.connect_timeout, up.read_timeout, up.max_connections) == (5.0, 60.0, 512)
    assert cfg.routes == (Route("/", "default"),)
    assert cfg.storage == Storage()
    assert cfg.storage.durability == "fsync"
    assert cfg.streams == Streams()
    assert cfg.shutdown_grace == 10.0
    assert cfg.log_level == "info"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == load_config(None, env={})


def test_units_are_converted(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, (
        "storage: {map_size: 512MiB, max_bytes: 2GB, retention: 7d, sweep_interval: 500ms}\n"
        "streams: {heartbeat: 1m, thread_linger: 0, max_request_body: 1048576}\n"
        "shutdown_grace: 0\n"))
    assert cfg.storage.map_size == 512 << 20
    assert cfg.storage.max_bytes == 2_000_000_000
    assert cfg.storage.retention == 7 * 86400.0
    assert cfg.storage.sweep_interval == 0.5
    assert cfg.streams.heartbeat == 60.0
    assert cfg.streams.thread_linger == 0.0
    assert cfg.streams.max_request_body == 1 << 20
    assert cfg.shutdown_grace == 0.0


def test_routes_get_a_catch_all_and_longest_prefix_first(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, (
        "upstreams: {default: http://a:1, support: [http://s1:1, http://s2:1]}\n"
        "routes:\n"
        "  - {prefix: /deployments, upstream: default}\n"
        "  - {prefix: /deployments/support/, upstream: support}\n"))
    assert cfg.routes == (Route("/deployments/support", "support"), Route("/deployments", "default"),
                          Route("/", "default"))
    assert cfg.upstream("support").urls == (URL("http://s1:1"), URL("http://s2:1"))


# --- flags override the file ----------------------------------------------------------------------

def test_flags_override_file(tmp_path: Path) -> None:
    text = ("listen: {host: 0.0.0.0, port: 9000}\n"
            "admin: {host: 0.0.0.0, port: 9001}\n"
            "upstreams:\n"
            "  default:\n"
            "    urls: [http://from-file:2024]\n"
            "    read_timeout: 90s\n"
            "storage: {path: /from/file, durability: none}\n"
            "log_level: warning\n")
    cfg = load_text(tmp_path, text, overrides=Overrides(
        host="127.0.0.2", port=7000, admin_host="127.0.0.3", admin_port=7001,
        upstreams=("http://flag-a:1", "http://flag-b:2"), data_dir=str(tmp_path / "d"), log_level="debug"))
    assert cfg.listen == Listen("127.0.0.2", 7000)
    assert cfg.admin == Listen("127.0.0.3", 7001)
    up = cfg.upstream("default")
    assert up.urls == (URL("http://flag-a:1"), URL("http://flag-b:2"))
    assert up.read_timeout == 90.0  # the rest of the upstream's section is kept
    assert cfg.storage.path == tmp_path / "d"
    assert cfg.storage.durability == "none"  # keys without a flag come from the file
    assert cfg.log_level == "debug"


def test_partial_flags_keep_the_rest_of_the_section(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "listen: {host: 0.0.0.0, port: 9000}\n", overrides=Overrides(port=7000))
    assert cfg.listen == Listen("0.0.0.0", 7000)


def test_upstream_flag_targets_first_upstream_without_default(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "upstreams: {agents: http://file:1}\n",
                    overrides=Overrides(upstreams=("http://flag:1",)))
    assert cfg.upstream("agents").urls == (URL("http://flag:1"),)
    assert cfg.routes == (Route("/", "agents"),)


def test_flag_values_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "", overrides=Overrides(upstreams=("not a url",)))
    assert info.value.field == "upstreams.default.urls[0]"


# --- the shipped example --------------------------------------------------------------------------

def test_example_config_loads_and_matches_defaults() -> None:
    cfg = load_config(str(EXAMPLE), env={})
    # The example documents the defaults, so it must not drift from them.
    assert cfg == load_config(None, env={})


def _keys(tree: object, at: str = "") -> set[str]:
    """Every mapping key of a parsed YAML tree, dotted (an upstream's name as "*")."""
    if not isinstance(tree, dict):
        return set()
    out: set[str] = set()
    for k, v in tree.items():
        name = f"{at}.{'*' if at == 'upstreams' else k}" if at else str(k)
        out |= {name} | _keys(v, name)
    return out


def test_example_config_lists_every_key_the_gateway_accepts() -> None:
    # The example says "Every key that gateway/config.py accepts is listed here with its default."
    # (Old names and aliases, streams.write_timeout and an upstream's `url`, are left out.)
    listed = _keys(yaml.safe_load(EXAMPLE.read_text()))
    sections: dict[str, Any] = {"": Config, "listen": Listen, "admin": Listen, "storage": Storage,
                                "streams": Streams, "clients": Clients, "upstreams.*": Upstream,
                                "upstreams.*.health": HealthCheck}
    accepted = {f"{at}.{f.name}" if at else f.name for at, kind in sections.items() for f in fields(kind)}
    accepted -= {"worker_index", "upstreams.*.name"}  # set by the supervisor; the upstream's key
    assert accepted - listed == set()


def test_example_config_env_hooks() -> None:
    cfg = load_config(str(EXAMPLE), env={"UPSTREAM_URL": "http://agent:8000", "GATEWAY_DATA_DIR": "/data"})
    assert cfg.upstream("default").urls == (URL("http://agent:8000"),)
    assert cfg.storage.path == Path("/data")


@pytest.mark.parametrize("workers, backend, shared", [(1, "lmdb", False), (2, "lmdb", True), (2, "redis", False)])
def test_workers_on_the_embedded_log_share_its_data_directory(tmp_path: Path, workers: int, backend: str,
                                                              shared: bool) -> None:
    cfg = load_text(tmp_path, "upstreams:\n  default:\n    urls: [http://127.0.0.1:2024]\n"
                    f"listen: {{port: 8080}}\nworkers: {workers}\nstorage: {{backend: {backend}}}\n")
    assert cfg.workers == workers and cfg.storage.shared is shared


def test_the_defaults_the_readme_states() -> None:
    """The numbers README.md gives as defaults, checked against the values themselves (the test above
    compares with the dataclasses, which would drift along with the code)."""
    cfg = load_config(None, env={})
    assert (cfg.listen.host, cfg.listen.port, cfg.admin.host, cfg.admin.port) == ("127.0.0.1", 8080, "127.0.0.1", 8081)
    assert cfg.storage.backend == "lmdb" and cfg.storage.path == Path("./data") and cfg.storage.durability == "fsync"
    assert cfg.storage.retention == 24 * 3600 and cfg.storage.lease_ttl == 6.0
    assert cfg.streams.heartbeat == 15.0 and cfg.streams.request_resumable is True
    assert cfg.streams.subscriber_buffer_bytes == 256 * 1024 and cfg.streams.replay_cache_bytes == 64 * 1024 * 1024
    assert cfg.clients.body_buffer_bytes == 1024 * 1024 and cfg.clients.body_timeout == 60.0
    assert cfg.clients.max_header_bytes == 1024 * 1024 and cfg.clients.max_headers == 1000
    assert cfg.workers == 1
