"""The Debian packages, installed with apt in a Debian 12 root and booted under a real systemd.

One build of the checkout (and one newer build for the upgrade), one cached
image, two roots, four boots:

* a plain Debian driver domain: a boot with a broken netvm.conf (fail
  closed), then a boot that serves hotplug events through the
  socket-activated agent, restarts init, upgrades to the newer build and
  purges;
* a Qubes template (doubles of Qubes' packages installed first, see
  :mod:`.qubes_doubles`): a boot as an AppVM (no network service), then one
  as a netvm, which ends by removing and purging the package.

Each boot's evidence is what the probe inside recorded
(:mod:`.probe`) and the container's journal, read from outside. Needs root,
``mmdebstrap``, ``systemd-container``, ``dpkg-dev``, ``debhelper``,
``dh-python``, ``pybuild-plugin-pyproject`` and ``lintian`` (``./dev``
installs them) and Debian's package servers; takes a few minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from . import qubes_doubles
from .container import (
    XENSTORED_UNIT,
    Boot,
    Build,
    Root,
    base_image,
    build_double,
    build_packages,
    deb_contents,
    deb_field,
    missing_host_tools,
    sh,
)

UPGRADE_VERSION_SUFFIX = "+ci1"
UNITS = ("vif-hotplug-init.service", "vif-hotplug-agent.socket", "vif-hotplug-agent.service",
         "vif-hotplug-dns-watch.service")
#: CAP_NET_ADMIN (12), CAP_NET_RAW (13), CAP_SYS_ADMIN (21): include/uapi/linux/capability.h.
AGENT_CAPABILITIES = (1 << 12) | (1 << 13) | (1 << 21)
DNS_WATCH_CAPABILITIES = (1 << 12) | (1 << 13)

NETVM_CONF = """\
[netvm]
gateway = 10.137.0.1
primary_dns = 10.139.1.1
secondary_dns = 10.139.1.2

[hotplug]
hooks_dir = /etc/ci-hooks

[mapped-ip]
10.137.0.6 = 10.138.0.6 10.138.0.1
"""
BROKEN_CONF = "[netvm]\ngateway = 10.137.0.999\n"
QUBES_NETVM_CONF = "[netvm]\ngateway = 10.137.0.1\nprimary_dns = 10.139.1.1\nsecondary_dns = 10.139.1.2\n"


@pytest.fixture(scope="module", autouse=True)
def host_ready() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (dpkg-buildpackage, mmdebstrap, systemd-nspawn)")
    missing = missing_host_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run the README's test command (./dev test installs them)")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vif-hotplug-system-", dir="/var/tmp"))
    try:
        yield path
    finally:
        # VIF_HOTPLUG_CI_KEEP=1 keeps the builds, roots and journals for a look.
        if os.environ.get("VIF_HOTPLUG_CI_KEEP") != "1":
            shutil.rmtree(path, ignore_errors=True)


def checkout_snapshot() -> dict[str, tuple[int, int]]:
    """Every file under the checkout (but .git and .venv) with its size and modification time."""
    top = Path(__file__).resolve().parents[2]
    out = {}
    for path in top.rglob("*"):
        rel = path.relative_to(top)
        if rel.parts[0] in (".git", ".venv") or "__pycache__" in rel.parts or not path.is_file():
            continue
        st = path.stat()
        out[str(rel)] = (st.st_size, st.st_mtime_ns)
    out.update({f"../{p.name}": (0, 0) for p in top.parent.glob("vif-hotplug*_*")})
    return out


@pytest.fixture(scope="module")
def checkout_changes(workdir: Path) -> Iterator[list[str]]:
    """Set by :func:`build`: what the build changed in the checkout (and beside it)."""
    yield []


@pytest.fixture(scope="module")
def build(workdir: Path, checkout_changes: list[str]) -> Build:
    (workdir / "build").mkdir()
    before = checkout_snapshot()
    built = build_packages(workdir / "build")
    after = checkout_snapshot()
    checkout_changes.extend(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    return built


@pytest.fixture(scope="module")
def newer_build(workdir: Path, build: Build) -> Build:
    (workdir / "newer").mkdir()
    return build_packages(workdir / "newer", version=build.version + UPGRADE_VERSION_SUFFIX)


@dataclass
class Plain:
    install_log: str
    broken: Boot
    main: Boot


@dataclass
class Qubes:
    install_log: str
    appvm: Boot
    netvm: Boot


def _with_xenstore(root: Root) -> None:
    root.write("/etc/systemd/system/ci-xenstored.service", XENSTORED_UNIT)
    root.enable("ci-xenstored.service")


@pytest.fixture(scope="module")
def plain(workdir: Path, build: Build, newer_build: Build) -> Plain:
    (workdir / "plain").mkdir()
    root = Root.from_image(base_image(), workdir / "plain")
    log = root.apt_install([build.debs["vif-hotplug"], build.debs["vif-hotplug-lab"]])
    _with_xenstore(root)
    root.write("/etc/ci-hooks/50-sandbox",
               "#!/usr/bin/python3\n" + (Path(__file__).parent / "sandbox_hook.py").read_text(), 0o755)
    root.enable("vif-hotplug-dns-watch.service")
    root.write("/etc/vif-hotplug/netvm.conf", BROKEN_CONF)
    broken = root.boot("broken")
    root.write("/etc/vif-hotplug/netvm.conf", NETVM_CONF)
    main = root.boot("main", binds=[(newer_build.changes.parent, "/debs-new")])
    return Plain(log, broken, main)


@pytest.fixture(scope="module")
def qubes(workdir: Path, build: Build) -> Qubes:
    (workdir / "qubes").mkdir()
    root = Root.from_image(base_image(), workdir / "qubes")
    doubles = [build_double(p, workdir / "qubes") for p in qubes_doubles.packages()]
    log = root.apt_install(doubles)
    log += root.apt_install([build.debs["vif-hotplug"], build.debs["vif-hotplug-lab"]], update=False)
    _with_xenstore(root)
    root.write("/etc/vif-hotplug/netvm.conf", QUBES_NETVM_CONF)
    root.write(qubes_doubles.SERVICES_FILE, "")
    appvm = root.boot("qubes-appvm")
    root.write(qubes_doubles.SERVICES_FILE, "qubes-network\nqubes-firewall\n")
    netvm = root.boot("qubes-netvm")
    return Qubes(log, appvm, netvm)


def done(boot: Boot) -> dict[str, Any]:
    """The probe's results, after checking that it ran to its end."""
    assert boot.results.get("done"), f"the {boot.scenario} probe did not finish:\n{boot.console[-3000:]}"
    assert "probe_error" not in boot.results, boot.results["probe_error"]
    return boot.results


def unit(results: dict[str, Any], name: str) -> dict[str, str]:
    return dict(results["units"][name])


def package_failures(results: dict[str, Any]) -> list[str]:
    return [line for line in results["failed"] if "vif-hotplug" in line]


# --- the build ------------------------------------------------------------------------------------


def test_the_build_has_no_lintian_errors(build: Build) -> None:
    proc = sh("lintian", "--fail-on", "error", "--display-level", ">=warning", build.changes, check=False,
              timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stdout.splitlines() if line.startswith("E:")], proc.stdout


def test_the_build_never_writes_into_the_checkout(build: Build, checkout_changes: list[str]) -> None:
    assert checkout_changes == []


def test_the_runtime_package_has_no_lab_and_the_lab_package_has_it_with_the_embedded_xenstored(
        build: Build) -> None:
    runtime = deb_contents(build.debs["vif-hotplug"])
    lab = deb_contents(build.debs["vif-hotplug-lab"])
    assert not [p for p in runtime if "/vif_hotplug/lab" in p]
    assert "/usr/lib/python3/dist-packages/vif_hotplug/lab/xenstored.py" in lab
    assert not [p for p in lab if "/vif_hotplug/" in p and "/vif_hotplug/lab" not in p]


def test_the_runtime_package_installs_into_usr_and_etc_only(build: Build) -> None:
    files = [p for p in deb_contents(build.debs["vif-hotplug"]) if p != "/"]
    assert not [p for p in files if p.startswith(("/usr/local", "/opt"))]
    for expected in ("/usr/bin/vif-hotplug", "/usr/bin/vif-route-qubes", "/usr/bin/qubes-setup-dnat-to-ns",
                     "/etc/xen/scripts/vif-route-qubes", "/etc/NetworkManager/dispatcher.d/qubes-nmhook",
                     "/etc/vif-hotplug/netvm.conf", "/lib/systemd/system/vif-hotplug-init.service",
                     "/usr/share/doc/vif-hotplug/examples/60-vif-hotplug.rules",
                     "/usr/lib/python3/dist-packages/vif_hotplug/agent/client.py"):
        assert expected in files, expected
    assert not [p for p in files if "rules.d" in p]


def test_the_runtime_package_depends_on_debians_python_libraries_only(build: Build) -> None:
    depends = deb_field(build.debs["vif-hotplug"], "Depends")
    for name in ("python3-pyroute2", "python3-nftables", "python3-iptables"):
        assert name in depends
    assert not re.search(r"pip|virtualenv|venv|gcc|python3-dev", depends), depends


def test_the_commands_are_the_thin_client_under_python3_isolated(build: Build, workdir: Path) -> None:
    sh("dpkg-deb", "-x", build.debs["vif-hotplug"], workdir / "extracted")
    for tool in ("vif-hotplug", "vif-route-qubes", "qubes-setup-dnat-to-ns"):
        text = (workdir / "extracted/usr/bin" / tool).read_text()
        assert "/usr/bin/python3 -I -S -c" in text and f"/usr/lib/python3/dist-packages {tool} " in text
    qubes_path = (workdir / "extracted/usr/lib/qubes/qubes-setup-dnat-to-ns").read_text()
    assert qubes_path == (workdir / "extracted/usr/bin/qubes-setup-dnat-to-ns").read_text()


# --- installation ------------------------------------------------------------------------------------


def test_apt_installs_debians_libraries_without_pip_or_a_compiler(plain: Plain) -> None:
    log = plain.install_log
    for name in ("python3-pyroute2", "python3-nftables", "python3-iptables", "libnftables1"):
        assert re.search(rf"^Setting up {name}(:[a-z0-9]+)? ", log, re.M), name
    assert not re.search(r"Setting up (python3-pip|python3-venv|gcc|python3-dev) ", log)


# --- a plain Debian driver domain: boot ----------------------------------------------------------------


def test_at_boot_the_base_firewall_is_in_place_before_network_pre_target(plain: Plain) -> None:
    r = done(plain.main)
    init, pre = unit(r, "vif-hotplug-init.service"), unit(r, "network-pre.target")
    assert init["ActiveState"] == "active" and init["Result"] == "success"
    assert pre["ActiveState"] == "active"
    assert 0 < int(init["ExecMainExitTimestampMonotonic"]) <= int(pre["ActiveEnterTimestampMonotonic"])
    assert "table ip qubes" in r["firewall"]["tables"]
    assert "policy drop" in r["firewall"]["input"]


def test_at_boot_the_agent_socket_listens_and_init_did_not_start_the_agent(plain: Plain) -> None:
    r = done(plain.main)
    assert unit(r, "vif-hotplug-agent.socket")["ActiveState"] == "active"
    assert r["socket_path"] and "/run/vif-hotplug/agent.sock" in r["listening"]
    assert unit(r, "vif-hotplug-agent.service")["ActiveState"] == "inactive"


def test_at_boot_nothing_of_the_package_fails_and_the_system_is_running(plain: Plain) -> None:
    r = done(plain.main)
    assert package_failures(r) == []
    assert r["system"] == "running", r["failed"]


def test_the_dns_watcher_runs_under_its_hardening(plain: Plain) -> None:
    r = done(plain.main)
    assert r["dns_watch"]["ActiveState"] == "active" and r["dns_watch"]["SubState"] == "running"
    status = r["dns_watch_status"]
    assert int(status["CapBnd"], 16) == DNS_WATCH_CAPABILITIES
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


# --- hotplug through the agent -------------------------------------------------------------------------------


def test_a_hotplug_event_starts_the_agent_by_socket_activation_and_reports_connected(plain: Plain) -> None:
    r = done(plain.main)
    assert r["online5"]["rc"] == 0, r["online5"]
    assert r["online5"]["hotplug-status"] == "connected"
    assert r["agent_after_online5"]["ActiveState"] == "active"
    agent_pid = r["agent_after_online5"]["MainPID"]
    served = plain.main.lines(SYSLOG_IDENTIFIER="vif-route-qubes", _PID=agent_pid)
    assert any("vif5.0: online done" in line for line in served), served


def test_the_journal_names_each_tool_and_the_vif_in_every_event_line(plain: Plain) -> None:
    r = done(plain.main)
    lines = plain.main.lines(SYSLOG_IDENTIFIER="vif-route-qubes")
    assert lines, "no journal line with identifier vif-route-qubes"
    assert all(re.match(r"vif[5-8]\.0: ", line) for line in lines), lines
    assert plain.main.lines(SYSLOG_IDENTIFIER="qubes-setup-dnat-to-ns"), "no line of the DNS tool"
    assert r["dns"]["rc"] in (0, 100), r["dns"]


def test_a_mapped_vif_gets_its_nat_namespace_where_the_toolstack_sees_it(plain: Plain) -> None:
    r = done(plain.main)
    assert r["online6"]["rc"] == 0 and r["online6"]["hotplug-status"] == "connected", r["online6"]
    assert "vif6.0-nat" in r["netns"]


def test_the_agent_switches_to_legacy_xtables_under_its_hardening(plain: Plain) -> None:
    r = done(plain.main)
    assert r["online7_iptables"]["rc"] == 0, r["online7_iptables"]
    assert "QBS-ANTISPOOF" in r["xtables"]


def test_restarting_init_returns_within_seconds_with_the_agent_still_serving(plain: Plain) -> None:
    r = done(plain.main)
    assert r["restart_init"]["rc"] == 0, r["restart_init"]
    assert r["restart_init"]["ms"] < 10_000
    assert r["after_restart"]["init"]["ActiveState"] == "active"
    assert "active" in (r["after_restart"]["agent"]["ActiveState"], r["after_restart"]["socket"]["ActiveState"])


# --- the sandbox (each option, through a hook the agent runs as its child) ---------------------------------


@pytest.fixture(scope="module")
def sandbox(plain: Plain) -> dict[str, Any]:
    hook = done(plain.main)["hook5"]
    assert hook, "the sandbox hook did not run"
    return dict(hook)


def test_the_agent_keeps_only_its_capabilities(plain: Plain, sandbox: dict[str, Any]) -> None:
    agent = done(plain.main)["agent_status"]
    assert int(agent["CapBnd"], 16) == AGENT_CAPABILITIES
    assert int(sandbox["status"]["CapBnd"], 16) == AGENT_CAPABILITIES


def test_the_agent_runs_with_no_new_privileges_and_a_seccomp_filter(sandbox: dict[str, Any]) -> None:
    assert sandbox["status"]["NoNewPrivs"] == "1"
    assert sandbox["status"]["Seccomp"] == "2"


def test_the_agent_can_open_only_unix_netlink_and_ip_sockets(sandbox: dict[str, Any]) -> None:
    assert sandbox["af_packet"] == "EAFNOSUPPORT"
    assert sandbox["af_netlink"] == "ok" and sandbox["af_inet"] == "ok"


def test_the_agent_may_make_network_namespaces_and_no_other(sandbox: dict[str, Any]) -> None:
    assert sandbox["unshare_net"] == "ok"
    assert sandbox["unshare_uts"] == "EPERM"


def test_the_agent_shares_the_mount_and_network_namespaces_of_the_system(
        plain: Plain, sandbox: dict[str, Any]) -> None:
    system = done(plain.main)["own_namespaces"]
    assert sandbox["mnt_ns"] == system["mnt_ns"] and sandbox["net_ns"] == system["net_ns"]


def test_the_agent_cannot_call_system_calls_outside_its_filter(sandbox: dict[str, Any]) -> None:
    # swapon(2) with CAP_SYS_ADMIN and a missing file is ENOENT unfiltered.
    assert sandbox["swapon"] == "EPERM"


def test_the_agent_cannot_change_personality_map_writable_code_or_set_setuid_bits(
        sandbox: dict[str, Any]) -> None:
    assert sandbox["personality_linux32"] == "EPERM"
    assert sandbox["mmap_write_exec"] == "EPERM"
    assert sandbox["chmod_suid"] == "EPERM"


def test_the_agent_cannot_change_the_hostname(sandbox: dict[str, Any]) -> None:
    # With CAP_SYS_ADMIN sethostname(2) succeeds unless ProtectHostname= gave it its own UTS namespace.
    assert sandbox["sethostname"] == "EPERM"


def test_the_agent_creates_files_for_root_alone(sandbox: dict[str, Any]) -> None:
    assert sandbox["umask"] == "0o77"


def test_the_agent_is_restarted_when_it_dies(plain: Plain) -> None:
    killed = done(plain.main)["agent_killed"]
    assert killed["after"]["ActiveState"] == "active"
    assert killed["after"]["MainPID"] != killed["before"]["MainPID"]
    assert int(killed["after"]["NRestarts"]) == int(killed["before"].get("NRestarts", "0") or 0) + 1


def test_every_unit_of_the_package_declares_the_hardening(plain: Plain) -> None:
    hardening = done(plain.main)["hardening"]
    for name in ("vif-hotplug-init.service", "vif-hotplug-agent.service", "vif-hotplug-dns-watch.service"):
        h = hardening[name]
        assert h["NoNewPrivileges"] == "yes", name
        assert h["SystemCallArchitectures"] == "native", name
        assert set(h["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}, name
        assert h["ProtectSystem"] == "no" and h["PrivateTmp"] == "no" and h["PrivateMounts"] == "no", name
        assert h["SystemCallErrorNumber"] in ("EPERM", "1") and h["LockPersonality"] == "yes", name
    assert hardening["vif-hotplug-init.service"]["Environment"] == "VIF_HOTPLUG_AGENT=off"
    assert hardening["vif-hotplug-agent.service"]["Restart"] == "on-failure"


# --- fail closed ------------------------------------------------------------------------------------------


def test_with_a_broken_netvm_conf_init_fails_and_network_pre_target_is_not_reached(plain: Plain) -> None:
    r = done(plain.broken)
    assert unit(r, "vif-hotplug-init.service")["ActiveState"] == "failed"
    pre = unit(r, "network-pre.target")
    assert pre["ActiveState"] != "active" and pre["ActiveEnterTimestampMonotonic"] == "0"
    assert r["firewall"]["ip_forward"] == "0"


def test_with_a_broken_netvm_conf_systemctl_status_names_the_reason_in_one_line(plain: Plain) -> None:
    status = done(plain.broken)["status"]["out"]
    reasons = [line for line in status.splitlines() if "invalid gateway" in line and "10.137.0.999" in line]
    assert reasons, status


def test_with_a_broken_netvm_conf_only_init_fails(plain: Plain) -> None:
    r = done(plain.broken)
    assert package_failures(r) == [next(x for x in r["failed"] if "vif-hotplug-init.service" in x)]


# --- upgrade and purge --------------------------------------------------------------------------------------


def test_an_upgrade_restarts_the_running_agent(plain: Plain, newer_build: Build) -> None:
    r = done(plain.main)
    assert r["upgrade"]["rc"] == 0, r["upgrade"]
    assert r["after_upgrade"]["version"] == newer_build.version
    before, after = r["before_upgrade"]["agent"], r["after_upgrade"]["agent"]
    assert before["ActiveState"] == "active" and after["ActiveState"] == "active"
    assert before["InvocationID"] != after["InvocationID"]


def test_after_an_upgrade_the_agent_keeps_serving(plain: Plain) -> None:
    r = done(plain.main)
    assert r["online8_after_upgrade"]["rc"] == 0
    assert r["online8_after_upgrade"]["hotplug-status"] == "connected"
    assert r["agent_after_online8"]["InvocationID"] == r["after_upgrade"]["agent"]["InvocationID"]


def test_an_upgrade_neither_stops_nor_restarts_init(plain: Plain) -> None:
    r = done(plain.main)
    before, after = r["before_upgrade"]["init"], r["after_upgrade"]["init"]
    assert after["ActiveState"] == "active"
    assert before["InvocationID"] == after["InvocationID"]
    assert r["after_upgrade"]["forward"] == "1"


def test_without_the_lab_package_lab_says_in_one_line_that_it_is_not_installed(plain: Plain) -> None:
    result = done(plain.main)["lab_without_lab_package"]
    assert result["rc"] == 2
    assert result["err"].strip().splitlines() == [result["err"].strip()]
    assert "not installed (package vif-hotplug-lab)" in result["err"]


def test_purge_leaves_no_unit_conffile_state_file_or_diversion(plain: Plain) -> None:
    r = done(plain.main)
    assert r["purge"]["rc"] == 0, r["purge"]
    after = r["after_purge"]
    assert [p for p, present in after["paths"].items() if present] == []
    assert after["unit_files"].strip() == ""
    assert all(u["LoadState"] == "not-found" for u in after["units"].values()), after["units"]
    assert "vif-hotplug" not in after["diversions"]
    assert after["dpkg"].strip() in ("", "un", "pn")
    assert after["agent_processes"] == []


def test_purge_leaves_the_running_netvms_firewall_in_place(plain: Plain) -> None:
    # The netvm runs on legacy xtables since the switch (test_the_agent_switches_to_legacy_xtables...).
    xtables = done(plain.main)["after_purge"]["xtables"]
    assert ":QBS-INPUT" in xtables and ":QBS-ANTISPOOF" in xtables, xtables


# --- a Qubes template --------------------------------------------------------------------------------------------


def test_in_a_qubes_vm_without_the_network_service_nothing_of_the_package_starts(qubes: Qubes) -> None:
    r = done(qubes.appvm)
    for name in UNITS:
        state = unit(r, name)
        assert state["ActiveState"] == "inactive", name
        assert state.get("ExecMainStartTimestampMonotonic", "0") == "0", name
    assert unit(r, "vif-hotplug-init.service")["ConditionResult"] == "no"
    assert unit(r, "vif-hotplug-agent.socket")["ConditionResult"] == "no"
    assert not [e for e in qubes.appvm.journal if e.get("_SYSTEMD_UNIT") in UNITS]


def test_in_a_qubes_vm_without_the_network_service_qubes_own_base_firewall_loads(qubes: Qubes) -> None:
    r = done(qubes.appvm)
    assert r["qubes"]["qubes-antispoof.service"]["ActiveState"] == "active"
    assert r["qubes"]["qubes-iptables.service"]["ActiveState"] == "active"
    assert "qubes-antispoof-loaded" in r["qubes_chains"]
    assert r["system"] == "running", r["failed"]


def test_in_a_qubes_netvm_exactly_one_unit_loads_the_base_firewall(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    assert unit(r, "vif-hotplug-init.service")["ActiveState"] == "active"
    for name in ("qubes-antispoof.service", "qubes-iptables.service"):
        assert r["qubes"][name]["ConditionResult"] == "no", name
    assert "qubes-antispoof-loaded" not in r["qubes_chains"]
    assert "policy drop" in r["firewall"]["input"]


def test_in_a_qubes_netvm_init_is_done_before_qubes_firewall_and_network_start(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    init_done = int(unit(r, "vif-hotplug-init.service")["ExecMainExitTimestampMonotonic"])
    for name in ("qubes-firewall.service", "qubes-network.service"):
        state = r["qubes"][name]
        assert state["ActiveState"] == "active" and state["Result"] == "success", (name, state)
        assert int(state["ExecMainStartTimestampMonotonic"]) >= init_done, name
    assert r["system"] == "running", r["failed"]


def test_in_a_qubes_netvm_the_toolstacks_script_is_this_packages(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    assert r["online9"]["rc"] == 0 and r["online9"]["hotplug-status"] == "connected", r["online9"]


def test_in_a_qubes_template_qubes_files_are_diverted_not_overwritten(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    for path, package in qubes_doubles.DIVERTED.items():
        assert f"diversion of {path} to " in r["diversions"] and "by vif-hotplug" in r["diversions"]
        assert r["installed_files"][path]["owner"].endswith(f": {path}")
        assert "vif-hotplug" in r["installed_files"][path]["owner"], r["installed_files"][path]
        assert f"({package})" not in (r["installed_files"][path]["text"] or ""), path


def test_removing_the_package_puts_qubes_files_back(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    assert r["remove"]["rc"] == 0, r["remove"]
    for path, package in qubes_doubles.DIVERTED.items():
        restored = r["removed_files"][path]
        assert restored["owner"] == f"{package}: {path}", restored
        assert restored["text"] and qubes_doubles.QUBES_TEXT.format(path=path, package=package) in restored["text"]


def test_purging_the_package_keeps_qubes_files_and_leaves_no_diversion(qubes: Qubes) -> None:
    r = done(qubes.netvm)
    assert r["purge"]["rc"] == 0, r["purge"]
    for path, package in qubes_doubles.DIVERTED.items():
        kept = r["purged_files"][path]
        assert kept["text"] and qubes_doubles.QUBES_TEXT.format(path=path, package=package) in kept["text"], path
    assert "vif-hotplug" not in r["diversions_after"]
