"""``vif-hotplug init`` and the netvm firewall of current Qubes, on both backends, with real packets.

Each test gets a fresh netvm namespace (:mod:`.hotplug_env`), runs once per
firewall backend, and reads the firewall back in one backend-independent
form (:mod:`.kernel_state`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from .conftest import NetnsFactory
from .hotplug_env import GATEWAY, GATEWAY6, UPLINK_NET, Netvm, capture, received, running_netvm
from .kernel_state import other_backend_is_empty

pytestmark = pytest.mark.netns

DNS1, DNS2 = "10.139.1.1", "10.139.1.2"
IPV4 = f"[netvm]\ngateway = {GATEWAY}\nprimary_dns = {DNS1}\nsecondary_dns = {DNS2}\n"
IPV6 = IPV4 + f"gateway6 = {GATEWAY6}\n"

#: The forward and input chains of current Qubes (canonical form of .kernel_state).
FORWARD = ["jump custom-forward", "ct state invalid drop", "ct state established,related accept", "oifgroup 2 drop"]
INPUT4 = [
    "jump custom-input", "ct state invalid drop", "iifgroup 2 udp dport 68 drop", "ct state established,related accept",
    "iifgroup 2 proto icmp accept", "iifname lo accept", "iifgroup 2 reject host-prohibited",
]
INPUT6 = [
    "jump custom-input", "ct state invalid drop", "ct state established,related accept", "iifgroup 2 goto _icmpv6",
    "iifname lo accept", "ip6 daddr fe80::/64 ip6 saddr fe80::/64 udp dport 546 accept", "proto icmpv6 accept",
]


@pytest.fixture
def netvm(make_netns: NetnsFactory, backend: str) -> Iterator[Netvm]:
    with running_netvm(make_netns, IPV4, backend) as env:
        env.write_conf(IPV4)
        env.ns.run("ip", "link", "set", "lo", "up")
        yield env


def _counting(rules: list[str]) -> list[str]:
    """Rules with a verdict: a nftables rule that only counts has no xtables counterpart."""
    return [r for r in rules if r]


# --- the ruleset ---------------------------------------------------------------------------


@pytest.mark.parametrize("conf", [IPV6, IPV4], ids=["ipv6-on", "ipv6-off"])
def test_second_init_leaves_the_same_state(netvm: Netvm, conf: str) -> None:
    netvm.write_conf(conf)
    netvm.tool("init")
    once = netvm.dump()
    netvm.tool("init")
    assert netvm.dump() == once


def test_second_init_reports_no_change(netvm: Netvm) -> None:
    netvm.tool("init")
    assert "nothing changed" in netvm.tool("init", "-v").stderr


def test_forward_drops_only_new_connections_towards_vms_and_accepts_the_rest(netvm: Netvm) -> None:
    netvm.tool("init")
    fw = netvm.firewall()
    assert _counting(fw.chain(4, "forward")) == FORWARD
    assert fw.policies[(4, "forward")] == "accept"


def test_input_follows_current_qubes(netvm: Netvm) -> None:
    netvm.tool("init")
    fw = netvm.firewall()
    assert _counting(fw.chain(4, "input")) == INPUT4
    assert fw.policies[(4, "input")] == "drop"


def test_ipv6_input_rejects_all_but_icmpv6_from_vms_and_drops_router_advertisements(netvm: Netvm) -> None:
    netvm.write_conf(IPV6)
    netvm.tool("init")
    fw = netvm.firewall()
    assert _counting(fw.chain(6, "input")) == INPUT6
    assert sorted(fw.chain(6, "_icmpv6")) == sorted([
        "proto != icmpv6 reject admin-prohibited", "icmpv6 type {134,137} drop", "accept",
    ]) or fw.chain(6, "_icmpv6") == [
        "proto != icmpv6 reject admin-prohibited", "icmpv6 type 134 drop", "icmpv6 type 137 drop", "accept",
    ]


def test_ipv6_off_drops_ip6_forwarding_and_everything_from_vms_but_keeps_the_netvms_own(netvm: Netvm) -> None:
    netvm.tool("init")
    fw = netvm.firewall()
    assert fw.policies[(6, "forward")] == "drop" and fw.policies[(6, "input")] == "drop"
    assert _counting(fw.chain(6, "input")) == [
        "jump custom-input", "ct state invalid drop", "iifgroup 2 drop", "ct state established,related accept",
        "iifname lo accept", "ip6 daddr fe80::/64 ip6 saddr fe80::/64 udp dport 546 accept", "proto icmpv6 accept",
    ]


def test_ipv6_on_masquerades_ipv6(netvm: Netvm) -> None:
    netvm.write_conf(IPV6)
    netvm.tool("init")
    assert netvm.firewall().chain(6, "postrouting")[-1] == "masquerade"


def test_init_switches_ipv4_forwarding_on(netvm: Netvm) -> None:
    netvm.tool("init")
    assert netvm.sysctl("net/ipv4/ip_forward") == "1"


@pytest.mark.parametrize(("conf", "want"), [(IPV6, "1"), (IPV4, "0")], ids=["ipv6-on", "ipv6-off"])
def test_init_switches_ipv6_forwarding_on_only_when_ipv6_is_on(netvm: Netvm, conf: str, want: str) -> None:
    netvm.write_conf(conf)
    netvm.tool("init")
    assert netvm.sysctl("net/ipv6/conf/all/forwarding") == want


def test_stop_switches_forwarding_off(netvm: Netvm) -> None:
    netvm.write_conf(IPV6)
    netvm.tool("init")
    netvm.tool("stop")
    assert (netvm.sysctl("net/ipv4/ip_forward"), netvm.sysctl("net/ipv6/conf/all/forwarding")) == ("0", "0")


def test_init_creates_the_anti_spoofing_sets(netvm: Netvm) -> None:
    netvm.tool("init")
    fw = netvm.firewall()
    for family in (4, 6):
        for name in ("allowed", "downstream", "connected"):
            assert (family, name) in fw.sets


def test_init_and_three_onlines_put_nothing_in_the_other_backend(netvm: Netvm) -> None:
    netvm.tool("init")
    for domid in (4, 5, 6):
        netvm.add_vm(domid)
        netvm.hotplug("online", domid)
    assert other_backend_is_empty(lambda *cmd: netvm.ns.run(*cmd), netvm.fw_backend)


def test_dry_run_prints_the_rules_and_changes_nothing(netvm: Netvm) -> None:
    before = netvm.dump()
    out = netvm.tool("init", "--dry-run").stdout
    assert ("QBS-FORWARD-BASE" in out) if netvm.fw_backend == "iptables" else ("jump custom-forward" in out)
    assert netvm.dump() == before


def test_the_dns_guard_sees_forwarded_packets_before_the_forward_chain(netvm: Netvm) -> None:
    netvm.tool("init")
    assert netvm.firewall().hooks[(4, "forward")] == ["dns-guard", "forward"]


# --- foreign state ------------------------------------------------------------------------


def _admin_rule(netvm: Netvm, chain: str, rule_nft: str, rule_ipt: list[str]) -> None:
    if netvm.fw_backend == "nftables":
        netvm.ns.run("nft", f"add rule ip qubes {chain} {rule_nft}")
    else:
        name = {"custom-forward": "QBS-FORWARD", "custom-input": "QBS-INPUT-ADMIN"}[chain]
        netvm.ns.run("iptables-legacy", "-A", name, *rule_ipt)


def test_a_rule_in_custom_forward_survives_init_online_and_offline(netvm: Netvm) -> None:
    netvm.tool("init")
    _admin_rule(netvm, "custom-forward", "ip daddr 198.51.100.7 drop", ["-d", "198.51.100.7/32", "-j", "DROP"])
    netvm.tool("init")
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    netvm.tool("init")
    assert netvm.firewall().chain(4, "custom-forward") == ["ip daddr 198.51.100.7 drop"]


def test_a_foreign_table_survives_init(netvm: Netvm) -> None:
    netvm.ns.run("nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; "
                 "add rule inet filter input tcp dport 22 accept")
    netvm.tool("init")
    netvm.tool("init")
    listed = netvm.ns.run("nft", "list", "table", "inet", "filter").stdout
    assert "tcp dport 22 accept" in listed


@pytest.mark.parametrize(("table", "rule"), [
    ("filter", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"),
    ("filter", "-A FORWARD -s 198.51.100.0/24 -j ACCEPT"),
    ("nat", "-A POSTROUTING -s 198.51.100.0/24 -j RETURN"),
], ids=["input", "forward", "nat"])
def test_foreign_xtables_rules_survive_init(netvm: Netvm, table: str, rule: str) -> None:
    netvm.ns.run("iptables-legacy", "-t", table, *rule.split())
    netvm.tool("init")
    netvm.tool("init")
    assert rule in netvm.ns.run("iptables-legacy-save", "-t", table).stdout


@pytest.mark.parametrize(("family", "chain"), [(4, "custom-input"), (4, "custom-forward"), (6, "custom-forward")])
def test_rules_in_the_administrators_chains_survive_init(netvm: Netvm, family: int, chain: str) -> None:
    netvm.write_conf(IPV6)
    netvm.tool("init")
    addr = "198.51.100.7" if family == 4 else "2001:db8::7"
    if netvm.fw_backend == "nftables":
        netvm.ns.run("nft", f"add rule {'ip6' if family == 6 else 'ip'} qubes {chain} {'ip6' if family == 6 else 'ip'} "
                     f"daddr {addr} drop")
    else:
        name = {"custom-forward": "QBS-FORWARD", "custom-input": "QBS-INPUT-ADMIN"}[chain]
        netvm.ns.run("ip6tables-legacy" if family == 6 else "iptables-legacy", "-A", name, "-d", addr, "-j", "DROP")
    netvm.tool("init")
    netvm.tool("init")
    assert netvm.firewall().chain(family, chain) == [f"{'ip6' if family == 6 else 'ip'} daddr {addr} drop"]


# --- with real packets ------------------------------------------------------------------------


def test_a_container_behind_the_netvm_still_reaches_the_uplink(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    ctr = netvm.factory("vhctr")
    netvm.ns.run("ip", "link", "add", "ctr0", "type", "veth", "peer", "name", "eth0", "netns", ctr.name)
    netvm.ns.run("ip", "addr", "add", "172.20.0.1/24", "dev", "ctr0")
    netvm.ns.run("ip", "link", "set", "ctr0", "up")
    ctr.run("ip", "addr", "add", "172.20.0.2/24", "dev", "eth0")
    ctr.run("ip", "link", "set", "eth0", "up")
    ctr.run("ip", "route", "add", "default", "via", "172.20.0.1")
    netvm.tool("init")
    got = received(up, f"{UPLINK_NET}.2", netvm.tmp / "up.log", [(ctr, "172.20.0.2", "from-container")])
    assert got == [f"{UPLINK_NET}.1 from-container"]  # forwarded, and NATed at this hop


def test_new_connections_from_the_uplink_to_a_vm_are_dropped(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    got = received(vm.ns, "10.137.0.5", netvm.tmp / "vm.log",
                   [(up, f"{UPLINK_NET}.2", "from-uplink"), (netvm.ns, GATEWAY, "control")])
    assert got == [f"{GATEWAY} control"]


def test_vm_to_vm_is_dropped_unless_the_administrator_allows_it_in_custom_forward(netvm: Netvm) -> None:
    a = netvm.add_vm(4, ["10.137.0.5"])
    b = netvm.add_vm(6, ["10.137.0.6"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    netvm.hotplug("online", 6)
    got = received(b.ns, "10.137.0.6", netvm.tmp / "b1.log", [(a.ns, "10.137.0.5", "vm-to-vm"),
                                                               (netvm.ns, GATEWAY, "control")])
    assert got == [f"{GATEWAY} control"]
    _admin_rule(netvm, "custom-forward", "ip saddr 10.137.0.5 ip daddr 10.137.0.6 accept",
                ["-s", "10.137.0.5/32", "-d", "10.137.0.6/32", "-j", "ACCEPT"])
    got = received(b.ns, "10.137.0.6", netvm.tmp / "b2.log", [(a.ns, "10.137.0.5", "allowed")], port=5001)
    assert got == ["10.137.0.5 allowed"]


def test_a_rule_in_custom_input_takes_effect_before_ours(netvm: Netvm) -> None:
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    _admin_rule(netvm, "custom-input", "udp dport 5000 accept", ["-p", "udp", "-m", "udp", "--dport", "5000",
                                                                  "-j", "ACCEPT"])
    got = received(netvm.ns, GATEWAY, netvm.tmp / "in.log", [(vm.ns, "10.137.0.5", "to-netvm")])
    assert got == ["10.137.0.5 to-netvm"]


CONNECTED = IPV4 + "connected_ips = 10.137.0.77 10.137.0.5\n"


def test_a_switched_off_vms_address_from_the_uplink_is_dropped(netvm: Netvm) -> None:
    netvm.write_conf(CONNECTED)
    up = netvm.add_uplink()
    netvm.tool("init")
    _admin_rule(netvm, "custom-input", "udp dport 5000 accept", ["-p", "udp", "-m", "udp", "--dport", "5000",
                                                                  "-j", "ACCEPT"])
    for addr in ("10.137.0.77", "10.137.0.99"):
        up.run("ip", "addr", "add", f"{addr}/32", "dev", "lo")
    got = received(netvm.ns, f"{UPLINK_NET}.1", netvm.tmp / "c.log",
                   [(up, "10.137.0.77", "connected"), (up, "10.137.0.99", "control")])
    assert got == ["10.137.0.99 control"]


def test_a_switched_off_vms_address_is_never_routed_out_of_the_uplink(netvm: Netvm) -> None:
    netvm.write_conf(CONNECTED)
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    up.run("ip", "addr", "add", "10.137.0.77/32", "dev", "lo")
    summary = capture(netvm.ns, "uplink0", "dst host 10.137.0.77", lambda: (
        subprocess.run(["ip", "netns", "exec", vm.ns.name, "ping", "-c1", "-W1", "10.137.0.77"], capture_output=True),
        subprocess.run(["ip", "netns", "exec", netvm.ns.name, "ping", "-c1", "-W1", "10.137.0.77"],
                       capture_output=True),
    ))
    assert "0 packets captured" in summary and "0 packets received by filter" in summary
    got = received(up, f"{UPLINK_NET}.2", netvm.tmp / "up.log", [(vm.ns, "10.137.0.5", "control")])
    assert got == [f"{UPLINK_NET}.1 control"]


def test_offline_of_a_connected_vm_keeps_its_address_protected(netvm: Netvm) -> None:
    netvm.write_conf(CONNECTED)
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    netvm.hotplug("offline", 4)
    fw = netvm.firewall()
    assert "10.137.0.5" in fw.members(4, "connected") and "10.137.0.5" not in fw.members(4, "downstream")


def test_connected_ips_follow_their_source_on_every_event(netvm: Netvm) -> None:
    netvm.write_conf(CONNECTED)
    netvm.tool("init")
    netvm.write_conf(IPV4 + "connected_ips = 10.137.0.78\n")
    netvm.add_vm(4)
    netvm.hotplug("online", 4)
    assert netvm.firewall().members(4, "connected") == {"10.137.0.78"}
    netvm.write_conf(IPV4 + "connected_ips = 10.137.0.79\n")
    netvm.tool("connected-ips")
    assert netvm.firewall().members(4, "connected") == {"10.137.0.79"}


def test_offline_purges_the_vms_conntrack_entries(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    netvm.ns.run("conntrack", "-I", "-s", "10.137.0.5", "-d", "192.0.2.2", "-p", "tcp", "--sport", "4000",
                 "--dport", "443", "--state", "ESTABLISHED", "--timeout", "300")
    netvm.ns.run("conntrack", "-I", "-s", "192.0.2.2", "-d", "10.137.0.5", "-p", "udp", "--sport", "53",
                 "--dport", "4001", "--timeout", "300")
    netvm.hotplug("offline", 4)
    assert "10.137.0.5" not in netvm.ns.run("conntrack", "-L", check=False).stdout


@pytest.mark.parametrize("resolv", ["", "\x7fELF garbage\n"], ids=["no upstream", "garbage resolv.conf"])
def test_right_after_init_a_dns_query_fails_fast_and_never_leaves(netvm: Netvm, resolv: str) -> None:
    (netvm.tmp / "resolv.conf").write_text(resolv)
    netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init", "--resolv-conf", str(netvm.tmp / "resolv.conf"))
    netvm.hotplug("online", 4)
    answers: list[subprocess.CompletedProcess[str]] = []
    start = time.monotonic()
    summary = capture(netvm.ns, "uplink0", "port 53", lambda: answers.append(vm.ns.run(
        "dig", "+tries=1", "+time=3", f"@{DNS1}", "name.test", check=False)))
    took = time.monotonic() - start
    assert "connection refused" in answers[0].stdout
    assert "0 packets captured" in summary and "0 packets received by filter" in summary
    assert took < 10  # a refusal, not a three-second timeout per try; generous for a loaded CI


def test_hardening_sets_the_interface_sysctls_only_when_asked(netvm: Netvm) -> None:
    netvm.add_vm(4, ["10.137.0.5"])
    netvm.hotplug("online", 4)
    assert netvm.sysctl("net/ipv4/conf/vif4.0/send_redirects") == "1"
    assert netvm.sysctl("net/ipv6/conf/vif4.0/drop_unsolicited_na") == "1"
    netvm.hotplug("offline", 4)
    netvm.write_conf(IPV4 + "\n[hotplug]\nharden = true\n")
    netvm.hotplug("online", 4)
    want = {"ipv4/conf/vif4.0/accept_source_route": "0", "ipv4/conf/vif4.0/accept_redirects": "0",
            "ipv4/conf/vif4.0/secure_redirects": "0", "ipv4/conf/vif4.0/send_redirects": "0",
            "ipv4/conf/vif4.0/drop_unicast_in_l2_multicast": "1", "ipv6/conf/vif4.0/accept_source_route": "-1",
            "ipv6/conf/vif4.0/accept_redirects": "0", "ipv6/conf/vif4.0/accept_ra": "0",
            "ipv6/conf/vif4.0/accept_dad": "0", "ipv6/conf/vif4.0/autoconf": "0",
            "ipv6/conf/vif4.0/drop_unicast_in_l2_multicast": "1"}
    assert {k: netvm.sysctl(f"net/{k}") for k in want} == want


# --- switching backends -----------------------------------------------------------------------


def test_switching_backends_under_traffic_never_lets_a_forged_packet_through(netvm: Netvm) -> None:
    up = netvm.add_uplink()
    vm = netvm.add_vm(4, ["10.137.0.5"])
    netvm.tool("init")
    netvm.hotplug("online", 4)
    vm.ns.run("ip", "addr", "add", "10.137.0.99/32", "dev", "lo")
    other = "iptables" if netvm.fw_backend == "nftables" else "nftables"
    log = netvm.tmp / "switch.log"
    from .hotplug_env import udp_listen

    listener = udp_listen(up, f"{UPLINK_NET}.2", 5000, log)
    sender = vm.ns.popen(["sh", "-c", f"while :; do {_send_cmd('10.137.0.99')}; done"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        netvm.write_conf(IPV4 + f"\n[firewall]\nbackend = {other}\n")
        netvm.tool("init")
        time.sleep(0.3)
    finally:
        sender.kill()
        sender.wait()
        listener.kill()
        listener.wait()
    netvm.fw_backend = other
    assert "forged" not in (log.read_text() if log.exists() else "")
    assert other_backend_is_empty(lambda *cmd: netvm.ns.run(*cmd), other)
    assert "vif4.0 . 10.137.0.5" in netvm.firewall().members(4, "allowed")
    got = received(up, f"{UPLINK_NET}.2", netvm.tmp / "after.log", [(vm.ns, "10.137.0.5", "genuine")], port=5001)
    assert got == [f"{UPLINK_NET}.1 genuine"]


def _send_cmd(src: str) -> str:
    import shlex

    from vif_hotplug.lab.probe import send_udp_argv

    return shlex.join(send_udp_argv(src, f"{UPLINK_NET}.2", 5000, "forged", count=1))


@pytest.mark.parametrize("admin_rule", [False, True], ids=["empty", "with a port forward"])
def test_after_a_switch_to_nftables_the_legacy_services_chain_goes_unless_the_administrator_uses_it(
    make_netns: NetnsFactory, admin_rule: bool,
) -> None:
    with running_netvm(make_netns, IPV4, "iptables") as netvm:
        netvm.tool("init")
        if admin_rule:
            netvm.ns.run("iptables-legacy", "-t", "nat", "-A", "PR-QBS-SERVICES", "-p", "tcp", "--dport", "8080",
                         "-j", "DNAT", "--to-destination", "10.137.0.9:80")
        netvm.tool("init", "--backend", "nftables")
        nat = netvm.ns.run("iptables-legacy-save", "-t", "nat").stdout
        assert ("PR-QBS-SERVICES" in nat) is admin_rule
        assert ("-j PR-QBS-SERVICES" in nat) is admin_rule
