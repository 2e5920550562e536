"""Settings from the environment (app.settings): defaults, overrides, a broken netvm.conf, path checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from vif_hotplug.app.settings import (
    DEFAULT_LOCK,
    DEFAULT_PATH,
    DEFAULT_XTABLES_LOCK,
    Settings,
    settings_from_env,
)
from vif_hotplug.core.errors import InvalidInput
from vif_hotplug.core.netvm_params import DEFAULT_HOOKS_DIR


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment whose netvm.conf does not exist and whose tools directory has no qubesdb-read."""
    (tmp_path / "bin").mkdir()
    return {"VIF_HOTPLUG_CONF": str(tmp_path / "netvm.conf"), "VIF_HOTPLUG_TOOLS_DIR": str(tmp_path / "bin")}


def write_conf(env: dict[str, str], text: str) -> None:
    Path(env["VIF_HOTPLUG_CONF"]).write_text(text)


def test_defaults_without_conf_or_overrides(env: dict[str, str]) -> None:
    s = settings_from_env(env)
    assert (s.conf, s.conf_error, s.hooks_dir, s.backend_choice) == (None, None, DEFAULT_HOOKS_DIR, "auto")
    assert (s.hotplug_lock, s.xtables_lock, s.state_dir) == (DEFAULT_LOCK, DEFAULT_XTABLES_LOCK, "/run/vif-hotplug")
    assert (s.xenstore_path, s.qubesdb_read) == (None, None)


def test_an_empty_environment_uses_the_default_path() -> None:
    assert settings_from_env({"VIF_HOTPLUG_CONF": "/nonexistent/netvm.conf"}).path == DEFAULT_PATH


def test_environment_overrides(env: dict[str, str], tmp_path: Path) -> None:
    s = settings_from_env({
        **env,
        "VIF_HOTPLUG_HOOKS_DIR": "/etc/hooks.d",
        "VIF_HOTPLUG_LOCK": "/tmp/x/hotplug.lock",
        "VIF_HOTPLUG_STATE_DIR": "/tmp/x/state",
        "XTABLES_LOCKFILE": "/tmp/x/xtables.lock",
        "XENSTORED_PATH": "/tmp/x/xs.sock",
    })
    assert (s.hooks_dir, s.hotplug_lock, s.xtables_lock, s.xenstore_path) == (
        "/etc/hooks.d", "/tmp/x/hotplug.lock", "/tmp/x/xtables.lock", "/tmp/x/xs.sock",
    )
    assert (s.state_dir, s.agent_socket, s.nftables_lock, s.dns_lock) == (
        "/tmp/x/state", "/tmp/x/state/agent.sock", "/tmp/x/state/nftables.lock", "/tmp/x/state/dns.lock",
    )


def test_hooks_dir_and_backend_come_from_the_conf(env: dict[str, str]) -> None:
    write_conf(env, "[hotplug]\nhooks_dir = /etc/hooks.d\n[firewall]\nbackend = nftables\n")
    s = settings_from_env(env)
    assert (s.hooks_dir, s.backend_choice, s.conf_path) == ("/etc/hooks.d", "nftables", env["VIF_HOTPLUG_CONF"])


def test_hooks_dir_from_the_environment_wins_over_the_conf(env: dict[str, str]) -> None:
    write_conf(env, "[hotplug]\nhooks_dir = /etc/hooks.d\n")
    assert settings_from_env({**env, "VIF_HOTPLUG_HOOKS_DIR": "/x"}).hooks_dir == "/x"


def test_the_conf_is_parsed_once_into_settings(env: dict[str, str]) -> None:
    write_conf(env, "[netvm]\ngateway = 10.137.0.1\n")
    s = settings_from_env(env)
    assert s.conf is not None and s.conf.params is not None and str(s.conf.params.gateway) == "10.137.0.1"


def test_a_bad_conf_is_recorded_not_raised(env: dict[str, str]) -> None:
    write_conf(env, "[netvm]\ngateway = 10.137.0.300\n")
    s = settings_from_env(env)
    assert s.conf is None and s.conf_error is not None and "10.137.0.300" in s.conf_error


def test_an_unreadable_conf_is_recorded_not_raised(env: dict[str, str]) -> None:
    Path(env["VIF_HOTPLUG_CONF"]).mkdir()
    s = settings_from_env(env)
    assert s.conf is None and s.conf_error is not None and env["VIF_HOTPLUG_CONF"] in s.conf_error


def test_qubesdb_read_is_found_in_the_tools_directory(env: dict[str, str]) -> None:
    exe = Path(env["VIF_HOTPLUG_TOOLS_DIR"]) / "qubesdb-read"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert settings_from_env(env).qubesdb_read == str(exe)


def test_path_never_picks_the_tools(env: dict[str, str], tmp_path: Path) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "qubesdb-read").write_text("#!/bin/sh\n")
    (evil / "qubesdb-read").chmod(0o755)
    s = settings_from_env({"VIF_HOTPLUG_CONF": env["VIF_HOTPLUG_CONF"], "PATH": str(evil)})
    assert s.path == DEFAULT_PATH and s.qubesdb_read != str(evil / "qubesdb-read")


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="a directory root owns is what is trusted")
def test_a_tools_directory_others_may_write_is_ignored(env: dict[str, str]) -> None:
    Path(env["VIF_HOTPLUG_TOOLS_DIR"]).chmod(0o777)
    assert settings_from_env(env).path == DEFAULT_PATH


@pytest.mark.parametrize(
    "name",
    ["VIF_HOTPLUG_CONF", "VIF_HOTPLUG_LOCK", "VIF_HOTPLUG_STATE_DIR", "XTABLES_LOCKFILE", "VIF_HOTPLUG_HOOKS_DIR",
     "VIF_HOTPLUG_AGENT_SOCKET"],
)
def test_relative_paths_are_refused(env: dict[str, str], name: str) -> None:
    with pytest.raises(InvalidInput, match="not an absolute path"):
        settings_from_env({**env, name: "relative/path"})


def test_with_backend_overrides_the_choice() -> None:
    assert Settings().with_backend("iptables").backend_choice == "iptables"
    assert Settings(backend_choice="nftables").with_backend(None).backend_choice == "nftables"


def test_with_backend_refuses_an_unknown_backend() -> None:
    with pytest.raises(InvalidInput, match="'pf'"):
        Settings().with_backend("pf")
