"""qubes-setup-dnat-to-ns against the kernel, and DNS traffic through a netvm.

Every test gets fresh namespaces and runs once per firewall backend; the
installed console script runs inside them through ``ip netns exec`` (so
``/etc/netns/<ns>/resolv.conf`` is the namespace's ``/etc/resolv.conf``),
configured by a netvm.conf given in ``VIF_HOTPLUG_CONF``. Rules are read back
in a backend-independent form (:mod:`.kernel_state`); DNS behaviour with
dnsmasq, dig and tcpdump.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.functional.conftest import Netns, NetnsFactory, entry_point, require_root, require_tool
from tests.functional.hotplug_env import capture
from tests.functional.kernel_state import FirewallState, read_firewall

TOOL = "qubes-setup-dnat-to-ns"
HOOK = Path(__file__).resolve().parents[2] / "etc/NetworkManager/dispatcher.d/qubes-nmhook"
DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
SERVER_A, SERVER_B = "192.0.2.53", "192.0.2.54"
ANSWER_A, ANSWER_B = "198.51.100.1", "198.51.100.2"
UPLINK = "upl0"  # the netvm's uplink: deliberately not eth0
CLIENT_IP = "10.137.0.5"
EXIT_CHANGED, EXIT_UNCHANGED, EXIT_ERROR = 0, 100, 1
#: Upper bound for waits on something that should happen (a daemon ready,
#: --watch reacting); a test never asserts how long it took.
PATIENCE = 20.0

pytestmark = pytest.mark.netns


def dnat(v: str, u: str) -> list[tuple[str, str, str]]:
    return [(v, "udp", u), (v, "tcp", u)]


GUARD = [DNS1, DNS2]
#: How -v and --dry-run show one DNAT rule, per backend.
RULE_TEXT = {
    "iptables": "iptables -t nat -A PR-QBS -d {0}/32 -p udp -m udp --dport 53 -j DNAT --to-destination {1}",
    "nftables": "ip daddr {0} udp dport 53 dnat to {1}",
}


@pytest.fixture
def conf_env(tmp_path: Path, backend: str) -> dict[str, str]:
    conf = tmp_path / "netvm.conf"
    conf.write_text(f"[netvm]\ngateway = 10.137.0.1\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
                    f"[firewall]\nbackend = {backend}\n")
    return {"VIF_HOTPLUG_CONF": str(conf), "VIF_HOTPLUG_STATE_DIR": str(tmp_path / "state"),
            "VIF_HOTPLUG_AGENT": "off", "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}


def set_resolv_conf(ns: Netns, text: str) -> None:
    """What ``/etc/resolv.conf`` reads as inside ``ip netns exec ns``."""
    d = Path("/etc/netns") / ns.name
    d.mkdir(parents=True, exist_ok=True)
    (d / "resolv.conf").write_text(text)


def tool(ns: Netns, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run(entry_point(TOOL), *args, check=False, env=env)


def fw(ns: Netns, backend: str) -> FirewallState:
    return read_firewall(lambda *cmd: ns.run(*cmd), backend)


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Netns:
    require_tool("iptables-legacy-save")
    require_tool("nft")
    return make_netns("dnsnv")


# --- rules ----------------------------------------------------------------------------


def test_one_upstream_serves_both_virtual_resolvers(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)


def test_two_upstreams_are_paired_in_order(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\nnameserver {SERVER_B}\n")
    tool(netvm, conf_env)
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_B)


def test_third_upstream_is_not_used(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\nnameserver {SERVER_B}\nnameserver 192.0.2.55\n")
    tool(netvm, conf_env)
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_B)


def test_no_upstream_leaves_nat_chain_empty(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, "nameserver 127.0.0.53\noptions edns0\n")
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert (fw(netvm, backend).has_chain(4, "dnat-dns"), fw(netvm, backend).dnat()) == (True, [])


def test_guard_chain_rejects_virtual_resolvers(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    assert fw(netvm, backend).guarded() == GUARD


def test_chains_are_jumped_from_prerouting_and_forward(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    state = fw(netvm, backend)
    assert (state.hooks.get((4, "prerouting")), state.hooks.get((4, "forward"))) == (["dnat-dns"], ["dns-guard"])


def test_virtual_resolver_listed_as_upstream_is_skipped(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {DNS1}\nnameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)


# A netvm behind another netvm (sys-firewall behind sys-net) is told the same
# virtual resolvers as any VM: its resolver configuration names only DNS1/DNS2.
CHAINED_RESOLV_CONF = f"nameserver {DNS1}\nnameserver {DNS2}\n"


def test_chained_netvm_neither_maps_nor_rejects(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF)
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert (fw(netvm, backend).dnat(), fw(netvm, backend).guarded()) == ([], [])


def test_chained_netvm_keeps_both_jumps(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF)
    tool(netvm, conf_env)
    state = fw(netvm, backend)
    assert (state.hooks.get((4, "prerouting")), state.hooks.get((4, "forward"))) == (["dnat-dns"], ["dns-guard"])


def test_rerun_of_chained_netvm_exits_100(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF)
    tool(netvm, conf_env)
    assert tool(netvm, conf_env).returncode == EXIT_UNCHANGED


def test_real_upstream_wins_over_listed_virtual_resolvers(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF + f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    assert (fw(netvm, backend).dnat(), fw(netvm, backend).guarded()) == (
        dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A), GUARD
    )


def test_leaving_the_chain_without_upstream_rejects_again(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF)
    tool(netvm, conf_env)
    set_resolv_conf(netvm, "")
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert (fw(netvm, backend).dnat(), fw(netvm, backend).guarded()) == ([], GUARD)


def test_resolv_conf_option_overrides_etc_resolv_conf(
    netvm: Netns, backend: str, conf_env: dict[str, str], tmp_path: Path
) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    given = tmp_path / "resolv.conf"
    given.write_text(f"nameserver {SERVER_B}\n")
    tool(netvm, conf_env, "--resolv-conf", str(given))
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B)


def test_rerun_with_same_upstreams_exits_100(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\nnameserver {SERVER_B}\n")
    tool(netvm, conf_env)
    assert tool(netvm, conf_env).returncode == EXIT_UNCHANGED


def test_rerun_without_upstream_exits_100(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, "")
    tool(netvm, conf_env)
    assert tool(netvm, conf_env).returncode == EXIT_UNCHANGED


@pytest.mark.parametrize("garbage", ["\x7fELF\x02\x01\x01\x00binary\n", "<html>captive portal</html>\n"])
def test_garbage_resolv_conf_is_a_one_line_error_and_keeps_the_rules(
    netvm: Netns, backend: str, conf_env: dict[str, str], garbage: str
) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    def rules() -> FirewallState:
        return fw(netvm, backend)

    before = rules()
    set_resolv_conf(netvm, garbage)
    proc = tool(netvm, conf_env)
    assert proc.returncode == EXIT_ERROR
    assert len(proc.stderr.strip().splitlines()) == 1 and "garbage in /etc/resolv.conf" in proc.stderr
    assert rules() == before


def test_changed_upstream_exits_0_with_new_rules(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    set_resolv_conf(netvm, f"nameserver {SERVER_B}\n")
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B)


def test_losing_upstreams_empties_nat_chain(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    set_resolv_conf(netvm, "")
    assert tool(netvm, conf_env).returncode == EXIT_CHANGED
    assert fw(netvm, backend).dnat() == []


def test_rules_outside_owned_chains_are_left_alone(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    if backend == "iptables":
        netvm.run("iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-p", "icmp", "-j", "ACCEPT")
        netvm.run("iptables-legacy", "-A", "FORWARD", "-i", "vif+", "-j", "ACCEPT")
    netvm.run("nft", "add table inet filter; add chain inet filter forward { type filter hook forward priority 0; }; "
              "add rule inet filter forward iifname vif0 accept")
    before = fw(netvm, backend).foreign
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env)
    state = fw(netvm, backend)
    assert state.foreign == before
    assert "inet filter forward" in " ".join(state.foreign) or backend == "iptables"
    assert state.dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)


def test_concurrent_runs_leave_exactly_one_correct_chain(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\nnameserver {SERVER_B}\n")
    env = {**os.environ, **conf_env}
    procs = [
        netvm.popen([entry_point(TOOL)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(10)
    ]
    codes = sorted(p.wait(timeout=120) for p in procs)
    for p in procs:
        assert p.stderr is not None
        p.stderr.close()
    assert codes == [EXIT_CHANGED] + [EXIT_UNCHANGED] * 9
    state = fw(netvm, backend)
    assert (state.hooks.get((4, "prerouting")), state.hooks.get((4, "forward"))) == (["dnat-dns"], ["dns-guard"])
    assert state.dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_B)
    assert state.guarded() == GUARD


# --- options and errors ----------------------------------------------------------


def test_dry_run_prints_rules(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    proc = tool(netvm, conf_env, "--dry-run")
    assert proc.returncode == EXIT_CHANGED
    assert RULE_TEXT[backend].format(DNS1, SERVER_A) in [line.strip() for line in proc.stdout.splitlines()]


def test_dry_run_says_chained(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, CHAINED_RESOLV_CONF)
    proc = tool(netvm, conf_env, "--dry-run")
    assert f"# chained: {DNS1}/{DNS2} forwarded unchanged to the upstream netvm" in proc.stdout.splitlines()


def test_dry_run_changes_nothing(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, conf_env, "--dry-run")
    assert (fw(netvm, backend).has_chain(4, "dnat-dns"), fw(netvm, backend).has_chain(4, "dns-guard")) == (False, False)


def test_verbose_prints_rules_and_applies_them(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    proc = tool(netvm, conf_env, "-v")
    assert RULE_TEXT[backend].format(DNS1, SERVER_A) in [line.strip() for line in proc.stdout.splitlines()]
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)


BAD_CONFIGS = [
    pytest.param("[netvm]\ngateway = 10.137.0.1\nprimary_dns = not-an-address\n", id="garbage address"),
    pytest.param("[netvm\nprimary_dns = 10.139.1.1\n", id="broken INI"),
    pytest.param("[netvm]\ngateway = 10.137.0.1\n", id="no virtual resolvers"),
    pytest.param("[netvm]\ngateway = 10.137.0.1\nprimary_dns = 2001:db8::1\n", id="IPv6 virtual resolver"),
]


@pytest.mark.parametrize("text", BAD_CONFIGS)
def test_bad_config_exits_1_with_one_line(netvm: Netns, tmp_path: Path, text: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    proc = tool(netvm, {"VIF_HOTPLUG_CONF": str(conf)})
    assert (proc.returncode, len(proc.stderr.strip().splitlines())) == (EXIT_ERROR, 1)


@pytest.mark.parametrize("text", BAD_CONFIGS)
def test_bad_config_changes_nothing(netvm: Netns, backend: str, tmp_path: Path, text: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    tool(netvm, {"VIF_HOTPLUG_CONF": str(conf), "VIF_HOTPLUG_STATE_DIR": str(tmp_path / "state")})
    assert not fw(netvm, backend).has_chain(4, "dnat-dns")


def test_missing_resolv_conf_option_file_exits_1(
    netvm: Netns, backend: str, conf_env: dict[str, str], tmp_path: Path
) -> None:
    proc = tool(netvm, conf_env, "--resolv-conf", str(tmp_path / "absent"))
    assert (proc.returncode, len(proc.stderr.strip().splitlines())) == (EXIT_ERROR, 1)


USAGE_ERRORS = [
    pytest.param(["--no-such-option"], id="unknown option"),
    pytest.param(["--resolv-conf"], id="option without its value"),
    pytest.param(["--dry-run", "--watch"], id="dry run and watch together"),
    pytest.param(["extra"], id="positional argument"),
]


@pytest.mark.parametrize("args", USAGE_ERRORS)
def test_usage_error_exits_1_with_one_line(args: list[str]) -> None:
    proc = subprocess.run([entry_point(TOOL), *args], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, len(proc.stderr.strip().splitlines())) == (EXIT_ERROR, 1)


def test_help_exits_0() -> None:
    proc = subprocess.run([entry_point(TOOL), "--help"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, "--resolv-conf" in proc.stdout) == (0, True)


# --- NetworkManager dispatcher hook ---------------------------------------------


def hook(ns: Netns, env: dict[str, str], action: str) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(entry_point(TOOL)).parent)
    return ns.run(str(HOOK), UPLINK, action, check=False, env={**env, "VIF_HOTPLUG_BIN": bindir})


@pytest.mark.parametrize("action", ["up", "vpn-up", "vpn-down", "dhcp4-change", "dns-change", "connectivity-change"])
def test_hook_applies_rules_on_network_change(
    netvm: Netns, backend: str, conf_env: dict[str, str], action: str
) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    assert hook(netvm, conf_env, action).returncode == 0
    assert fw(netvm, backend).dnat() == dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)


def test_hook_exits_0_when_nothing_changed(netvm: Netns, backend: str, conf_env: dict[str, str]) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    hook(netvm, conf_env, "up")
    assert hook(netvm, conf_env, "dhcp4-change").returncode == 0


@pytest.mark.parametrize("action", ["down", "pre-up", "hostname", ""])
def test_hook_ignores_other_actions(netvm: Netns, backend: str, conf_env: dict[str, str], action: str) -> None:
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    assert hook(netvm, conf_env, action).returncode == 0
    assert not fw(netvm, backend).has_chain(4, "dnat-dns")


def test_hook_fails_when_tool_fails(netvm: Netns, tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[netvm]\nprimary_dns = garbage\n")
    assert hook(netvm, {"VIF_HOTPLUG_CONF": str(conf)}, "up").returncode == EXIT_ERROR


def test_hook_is_executable() -> None:
    assert os.access(HOOK, os.X_OK)


# --- --watch -------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def replace_file(path: Path, text: str) -> None:
    """Write the way resolver managers do: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.rename(path)


@pytest.fixture
def watcher(
    netvm: Netns, backend: str, conf_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {SERVER_A}\n")
    log = tmp_path / "watch.log"
    with log.open("w") as err:
        proc = netvm.popen(
            [entry_point(TOOL), "-vv", "--watch", "--resolv-conf", str(resolv)],
            env={**os.environ, **conf_env}, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        first = dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)
        wait_for("the first apply", lambda: fw(netvm, backend).dnat() == first)
        yield proc, resolv
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_reapplies_when_resolv_conf_is_replaced(
    netvm: Netns, backend: str, watcher: tuple[subprocess.Popen[str], Path]
) -> None:
    _, resolv = watcher
    replace_file(resolv, f"nameserver {SERVER_B}\n")
    wait_for("new rules", lambda: fw(netvm, backend).dnat() == dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B))
    assert_woken_by_inotify(resolv.parent / "watch.log")


def test_watch_reapplies_when_resolv_conf_is_rewritten_in_place(
    netvm: Netns, backend: str, watcher: tuple[subprocess.Popen[str], Path]
) -> None:
    _, resolv = watcher
    resolv.write_text(f"nameserver {SERVER_B}\n")
    wait_for("new rules", lambda: fw(netvm, backend).dnat() == dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B))
    assert_woken_by_inotify(resolv.parent / "watch.log")


def assert_woken_by_inotify(log: Path) -> None:
    """The change was not found by the watch's 2 s poll (which would hide a broken inotify): it woke
    the watch through inotify, or came before the watch went back to waiting."""
    lines = log.read_text().splitlines()
    applied = [i for i, line in enumerate(lines) if "DNS DNAT now" in line]
    assert len(applied) >= 2, lines
    assert not any("(poll)" in line for line in lines[applied[0]:applied[-1]]), lines


def test_watch_keeps_running_until_missing_resolv_conf_appears(
    netvm: Netns, backend: str, conf_env: dict[str, str], tmp_path: Path
) -> None:
    resolv = tmp_path / "later" / "resolv.conf"
    proc = netvm.popen(
        [entry_point(TOOL), "--watch", "--resolv-conf", str(resolv)], env={**os.environ, **conf_env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        assert "does not exist" in proc.stderr.readline()  # the first apply failed; it keeps going
        resolv.parent.mkdir()
        replace_file(resolv, f"nameserver {SERVER_B}\n")
        second = dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B)
        wait_for("rules from the new file", lambda: fw(netvm, backend).dnat() == second)
    finally:
        proc.kill()
        proc.communicate()


def test_watch_follows_etc_resolv_conf_by_default(
    netvm: Netns, backend: str, conf_env: dict[str, str], tmp_path: Path,
) -> None:
    # /etc/resolv.conf is the namespace's file bind-mounted by ip netns exec:
    # only in-place writes reach it, so this also proves the file itself is watched.
    set_resolv_conf(netvm, f"nameserver {SERVER_A}\n")
    log = tmp_path / "watch.log"
    with log.open("w") as err:
        proc = netvm.popen(
            [entry_point(TOOL), "-vv", "--watch"], env={**os.environ, **conf_env},
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        first = dnat(DNS1, SERVER_A) + dnat(DNS2, SERVER_A)
        wait_for("the first apply", lambda: fw(netvm, backend).dnat() == first)
        set_resolv_conf(netvm, f"nameserver {SERVER_B}\n")
        second = dnat(DNS1, SERVER_B) + dnat(DNS2, SERVER_B)
        wait_for("new rules", lambda: fw(netvm, backend).dnat() == second)
        assert_woken_by_inotify(log)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_watch_stops_cleanly_on_signal(watcher: tuple[subprocess.Popen[str], Path], sig: signal.Signals) -> None:
    proc, _ = watcher
    proc.send_signal(sig)
    assert proc.wait(timeout=PATIENCE) == 0


# --- end to end: client -> netvm -> uplink with real DNS servers -------------------


@dataclass
class Lab:
    uplink: Netns
    netvm: Netns
    client: Netns
    env: dict[str, str]
    servers: dict[str, subprocess.Popen[str]]

    def setup_dns(self, *args: str) -> int:
        return tool(self.netvm, self.env, *args).returncode

    def dig(self, server: str, *opts: str) -> subprocess.CompletedProcess[str]:
        return self.client.run("dig", "+tries=1", "+time=2", *opts, f"@{server}", "name.test.lab", check=False)

    def answer(self, server: str, *opts: str) -> str:
        return self.dig(server, "+short", *opts).stdout.strip()

    def start_server(self, address: str, answer: str) -> None:
        self.uplink.run("ip", "addr", "add", f"{address}/24", "dev", "isp0")
        self.servers[address] = self.uplink.popen(
            [
                require_tool("dnsmasq"), "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                "--pid-file=", "--port=53", f"--listen-address={address}", "--bind-interfaces",
                f"--address=/test.lab/{answer}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        probe = ["dig", "+short", "+tries=1", "+time=1", f"@{address}", "probe.test.lab"]
        wait_for(f"dnsmasq on {address}", lambda: self.uplink.run(*probe, check=False).stdout.strip() == answer)


@pytest.fixture
def lab(make_netns: NetnsFactory, conf_env: dict[str, str]) -> Iterator[Lab]:
    """client (eth0) -- (vif5.0) netvm (upl0) -- (isp0) uplink with DNS servers."""
    require_root()
    for name in ("dig", "dnsmasq", "iptables-legacy", "iptables-legacy-save"):
        require_tool(name)
    uplink, netvm, client = make_netns("dnsup"), make_netns("dnsnv"), make_netns("dnscl")
    netvm.run("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "isp0", "netns", uplink.name)
    netvm.run("ip", "link", "add", "vif5.0", "type", "veth", "peer", "name", "eth0", "netns", client.name)
    uplink.run("ip", "addr", "add", "192.0.2.1/24", "dev", "isp0")
    uplink.run("ip", "link", "set", "isp0", "up")
    netvm.run("ip", "addr", "add", "192.0.2.2/24", "dev", UPLINK)
    netvm.run("ip", "link", "set", UPLINK, "up")
    netvm.run("ip", "route", "add", "default", "via", "192.0.2.1")
    netvm.run("ip", "addr", "add", "10.137.0.1/24", "dev", "vif5.0")
    netvm.run("ip", "link", "set", "vif5.0", "up")
    netvm.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    netvm.run("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", UPLINK, "-j", "MASQUERADE")
    client.run("ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    client.run("ip", "link", "set", "eth0", "up")
    client.run("ip", "route", "add", "default", "via", "10.137.0.1")
    the_lab = Lab(uplink, netvm, client, conf_env, {})
    try:
        the_lab.start_server(SERVER_A, ANSWER_A)
        yield the_lab
    finally:
        for proc in the_lab.servers.values():
            proc.terminate()
            proc.wait(timeout=PATIENCE)


TRANSPORTS = [pytest.param((), id="udp"), pytest.param(("+tcp",), id="tcp")]
RESOLVERS = [pytest.param(DNS1, id="DNS1"), pytest.param(DNS2, id="DNS2")]


@pytest.mark.parametrize("opts", TRANSPORTS)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_client_resolves_through_virtual_resolver(lab: Lab, resolver: str, opts: tuple[str, ...]) -> None:
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    lab.setup_dns()
    assert lab.answer(resolver, *opts) == ANSWER_A


@pytest.mark.parametrize("opts", TRANSPORTS)
def test_second_virtual_resolver_reaches_second_upstream(lab: Lab, opts: tuple[str, ...]) -> None:
    lab.start_server(SERVER_B, ANSWER_B)
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\nnameserver {SERVER_B}\n")
    lab.setup_dns()
    assert (lab.answer(DNS1, *opts), lab.answer(DNS2, *opts)) == (ANSWER_A, ANSWER_B)


@pytest.mark.parametrize("opts", TRANSPORTS)
def test_queries_reach_new_upstream_after_change(lab: Lab, opts: tuple[str, ...]) -> None:
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    lab.setup_dns()
    lab.answer(DNS1, *opts)
    lab.start_server(SERVER_B, ANSWER_B)
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_B}\n")
    assert lab.setup_dns() == EXIT_CHANGED
    assert lab.answer(DNS1, *opts) == ANSWER_B


def test_existing_udp_flow_follows_new_upstream(lab: Lab) -> None:
    # Same source port twice: the same conntrack entry unless the tool
    # deleted it when the rules changed.
    port = ("-b", f"{CLIENT_IP}#40053")
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    lab.setup_dns()
    assert lab.answer(DNS1, *port) == ANSWER_A
    lab.start_server(SERVER_B, ANSWER_B)
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_B}\n")
    lab.setup_dns()
    assert lab.answer(DNS1, *port) == ANSWER_B


@pytest.mark.parametrize("opts", TRANSPORTS)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_no_upstream_query_is_refused_not_timed_out(lab: Lab, resolver: str, opts: tuple[str, ...]) -> None:
    set_resolv_conf(lab.netvm, "nameserver 127.0.0.53\n")
    lab.setup_dns()
    out = lab.dig(resolver, *opts).stdout
    assert ("connection refused" in out, "timed out" in out) == (True, False)


@pytest.mark.parametrize("opts", TRANSPORTS)
def test_upstream_lost_after_working_query_is_refused(lab: Lab, opts: tuple[str, ...]) -> None:
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    lab.setup_dns()
    lab.answer(DNS1, *opts)
    set_resolv_conf(lab.netvm, "")
    lab.setup_dns()
    assert "connection refused" in lab.dig(DNS1, *opts).stdout


@pytest.fixture
def chained(lab: Lab, make_netns: NetnsFactory) -> Lab:
    """A second netvm A chained behind the lab's netvm B, with a client of its own.

    client (eth0) -- (vif7.0) netvm A (eth0) -- (vif6.0) netvm B (upl0) -- (isp0) uplink.
    A is a VM of B, as sys-firewall is of sys-net: its default route points
    at B, it masquerades what it forwards there (NAT at every hop, so B
    needs no route back to A's clients), and its resolv.conf names only the
    virtual resolvers. The returned lab's ``netvm`` is A; ``lab.netvm`` is B.
    """
    netvm_a, client = make_netns("dnsnva"), make_netns("dnscl")
    lab.netvm.run("ip", "link", "add", "vif6.0", "type", "veth", "peer", "name", "eth0", "netns", netvm_a.name)
    netvm_a.run("ip", "link", "add", "vif7.0", "type", "veth", "peer", "name", "eth0", "netns", client.name)
    lab.netvm.run("ip", "addr", "add", "10.138.0.1/24", "dev", "vif6.0")
    lab.netvm.run("ip", "link", "set", "vif6.0", "up")
    netvm_a.run("ip", "addr", "add", "10.138.0.6/24", "dev", "eth0")
    netvm_a.run("ip", "link", "set", "eth0", "up")
    netvm_a.run("ip", "route", "add", "default", "via", "10.138.0.1")
    netvm_a.run("ip", "addr", "add", "10.137.2.1/24", "dev", "vif7.0")
    netvm_a.run("ip", "link", "set", "vif7.0", "up")
    netvm_a.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    netvm_a.run("iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
    client.run("ip", "addr", "add", "10.137.2.5/24", "dev", "eth0")
    client.run("ip", "link", "set", "eth0", "up")
    client.run("ip", "route", "add", "default", "via", "10.137.2.1")
    set_resolv_conf(netvm_a, CHAINED_RESOLV_CONF)
    # Same servers dict: the lab fixture stops whatever this one starts.
    return Lab(lab.uplink, netvm_a, client, lab.env, lab.servers)


@pytest.mark.parametrize("opts", TRANSPORTS)
@pytest.mark.parametrize("resolver", RESOLVERS)
def test_chained_netvm_client_resolves_through_upstream_netvm(
    lab: Lab, chained: Lab, resolver: str, opts: tuple[str, ...]
) -> None:
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    for _ in range(2):  # a second apply in either netvm must keep it working
        lab.setup_dns()
        chained.setup_dns()
    assert chained.answer(resolver, *opts) == ANSWER_A


@pytest.mark.parametrize("opts", TRANSPORTS)
def test_chained_netvm_query_is_refused_when_upstream_netvm_has_no_upstream(
    lab: Lab, chained: Lab, opts: tuple[str, ...]
) -> None:
    # The downstream netvm lets the query through; the upstream one rejects
    # it, and the rejection finds its way back through both NATs.
    set_resolv_conf(lab.netvm, "nameserver 127.0.0.53\n")
    lab.setup_dns()
    chained.setup_dns()
    out = chained.dig(DNS1, *opts).stdout
    assert ("connection refused" in out, "timed out" in out) == (True, False)


@pytest.mark.parametrize("opts", TRANSPORTS)
def test_no_upstream_query_never_leaves_uplink(lab: Lab, opts: tuple[str, ...]) -> None:
    set_resolv_conf(lab.netvm, "nameserver 127.0.0.53\n")
    lab.setup_dns()
    summary = capture(lab.netvm, UPLINK, "-c1 port 53", lambda: lab.dig(DNS1, *opts))
    # "received by filter" counts in the kernel, so it also covers a packet
    # still buffered when tcpdump was stopped.
    assert ("0 packets captured" in summary, "0 packets received by filter" in summary) == (True, True)


def test_query_with_upstream_is_seen_on_uplink(lab: Lab) -> None:
    # Control for the test above: the same capture does see a forwarded query.
    set_resolv_conf(lab.netvm, f"nameserver {SERVER_A}\n")
    lab.setup_dns()
    summary = capture(lab.netvm, UPLINK, "-c1 port 53", lambda: lab.dig(DNS1))
    assert "1 packet captured" in summary
