"""The lab's pure parts (topology, parsers of both backends' tools, probes' argv, reporting),
its checks against a fake shell, and its refusals; no root needed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from vif_hotplug.lab import checks, probe, runner
from vif_hotplug.lab.checks import (
    Checker,
    CheckResult,
    DropCounters,
    FirewallTools,
    SetMember,
    Tools,
    addresses_of,
    dig_answers,
    drop_counters,
    format_table,
    ipset_members,
    member_mentions,
    nft_drop_counters,
    nft_set_members,
    route_destinations,
    set_members,
    to_json,
    xtables_drop_counters,
)
from vif_hotplug.lab.topology import (
    NETBACK_MAC,
    LabPaths,
    hotplug_env,
    make_vm,
    netvm_commands,
    netvm_conf,
    netvm_xenstore_entries,
    plan_topology,
    tool_env,
    uplink_commands,
    vif_commands,
    vm_commands,
    vm_ipv6,
    vm_xenstore_entries,
)

# --- topology --------------------------------------------------------------------


def test_namespaces_carry_prefix_and_lab_id() -> None:
    topo = plan_topology("abc123", 3, False)
    assert all(ns.startswith("vhlab-abc123-") for ns in topo.namespaces)
    assert len(set(topo.namespaces)) == 5


def test_vms_get_consecutive_domids_and_vif_names() -> None:
    topo = plan_topology("x", 3, False)
    assert [vm.vif for vm in topo.vms] == ["vif11.0", "vif12.0", "vif13.0"]
    assert [str(vm.ipv4) for vm in topo.vms] == ["10.137.0.11", "10.137.0.12", "10.137.0.13"]


def test_vm_mac_is_xen_prefixed_and_unique() -> None:
    macs = [vm.mac for vm in plan_topology("x", 5, False).vms]
    assert all(m.startswith("00:16:3e:") for m in macs)
    assert len(set(macs)) == 5


def test_ipv6_lab_leaves_last_vm_ipv4_only() -> None:
    vms = plan_topology("x", 3, True).vms
    assert [vm.ipv6 is not None for vm in vms] == [True, True, False]
    assert vms[-1].ipv6_self is not None  # it still tries


def test_vm_ipv6_embeds_the_ipv4_address_like_qubes() -> None:
    assert vm_ipv6(IPv4Address("10.137.0.11")) == IPv6Address("fd09:24ef:4179::a89:b")


@pytest.mark.parametrize(("vms", "ipv6"), [(0, False), (51, False), (1, True)])
def test_vm_count_out_of_range_is_refused(vms: int, ipv6: bool) -> None:
    with pytest.raises(ValueError, match="--vms"):
        plan_topology("x", vms, ipv6)


@pytest.mark.parametrize("domid", [0, 255])
def test_make_vm_refuses_a_domid_outside_the_vm_range(domid: int) -> None:
    with pytest.raises(ValueError, match="domid"):
        make_vm(domid, "ns")


def test_every_step_runs_inside_a_lab_namespace() -> None:
    topo = plan_topology("x", 2, True)
    steps = netvm_commands(topo) + uplink_commands(topo)
    steps += [s for vm in topo.vms for s in vif_commands(topo.netvm_ns, vm) + vm_commands(vm)]
    assert {ns for ns, _ in steps} <= set(topo.namespaces)


def test_netvm_has_no_vif_before_its_vms_start() -> None:
    topo = plan_topology("x", 2, False)
    assert not [a for _, a in netvm_commands(topo) if any(vm.vif in a for vm in topo.vms)]


def test_vif_end_has_netback_mac_and_peer_lands_in_the_vm() -> None:
    topo = plan_topology("x", 1, False)
    vm = topo.vms[0]
    ((ns, argv),) = vif_commands(topo.netvm_ns, vm)
    assert ns == topo.netvm_ns
    assert argv[argv.index(vm.vif) + 2] == NETBACK_MAC
    assert argv[-1] == vm.ns and vm.mac in argv


def test_netvm_uplink_is_not_eth0() -> None:
    argv = [a for _, a in netvm_commands(plan_topology("x", 1, False))]
    assert not [a for a in argv if "eth0" in a]


def test_vm_configures_itself_like_a_qubes_vm() -> None:
    cmds = [" ".join(a) for _, a in vm_commands(plan_topology("x", 1, False).vms[0])]
    assert "ip addr add 10.137.0.11/32 dev eth0" in cmds
    assert f"ip neigh replace 10.137.0.1 lladdr {NETBACK_MAC} dev eth0 nud permanent" in cmds
    assert "ip route add default via 10.137.0.1 dev eth0 onlink" in cmds


def test_xenstore_backend_holds_what_libxl_writes() -> None:
    vms = plan_topology("x", 2, True).vms
    entries = dict(vm_xenstore_entries(vms[0], "x-vm11") + vm_xenstore_entries(vms[1], "x-vm12"))
    be = "/local/domain/0/backend/vif/11/0"
    assert entries[f"{be}/ip"] == "10.137.0.11 fd09:24ef:4179::a89:b"
    assert entries[f"{be}/script"] == "/etc/xen/scripts/vif-route-qubes"
    assert entries[f"{be}/frontend-id"] == "11"
    assert entries["/local/domain/0/backend/vif/12/0/ip"] == "10.137.0.12"
    assert entries["/local/domain/11/name"] == "x-vm11"


@pytest.mark.parametrize("ipv6", [True, False])
def test_xenstore_has_gateway6_only_with_ipv6(ipv6: bool) -> None:
    entries = dict(netvm_xenstore_entries(ipv6))
    assert ("/local/domain/0/qubes-netvm-gateway6" in entries) is ipv6
    assert entries["/local/domain/0/qubes-netvm-gateway"] == "10.137.0.1"


def test_hotplug_env_is_the_toolstacks() -> None:
    vm = plan_topology("x", 1, False).vms[0]
    env = hotplug_env(vm, LabPaths("/tmp/t"), {"PATH": "/bin"})
    assert env["XENBUS_PATH"] == "backend/vif/11/0"
    assert env["vif"] == "vif11.0"
    assert (env["XENBUS_TYPE"], env["XENBUS_BASE_PATH"], env["netdev"]) == ("vif", "backend", "")
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize(
    "key", ["XENSTORED_PATH", "VIF_HOTPLUG_CONF", "VIF_HOTPLUG_LOCK", "VIF_HOTPLUG_STATE_DIR", "XTABLES_LOCKFILE"]
)
def test_every_tool_keeps_its_state_in_the_lab_tmpdir(key: str) -> None:
    env = tool_env(LabPaths("/tmp/t"), {key: "/run/elsewhere"})
    assert env[key].startswith("/tmp/t/")


def test_tools_never_use_a_resident_agent() -> None:
    assert tool_env(LabPaths("/tmp/t"), {"VIF_HOTPLUG_AGENT": "on"})["VIF_HOTPLUG_AGENT"] == "off"


@pytest.mark.parametrize("with_params", [True, False])
def test_netvm_conf_names_params_only_when_asked(with_params: bool) -> None:
    text = netvm_conf(False, "/tmp/t/hooks.d", "auto", with_params)
    assert "hooks_dir = /tmp/t/hooks.d" in text
    assert ("gateway = 10.137.0.1" in text) is with_params


@pytest.mark.parametrize("backend", ["auto", "nftables", "iptables"])
def test_netvm_conf_names_the_firewall_backend(backend: str) -> None:
    text = netvm_conf(True, "/tmp/t/hooks.d", backend, True)
    assert f"[firewall]\nbackend = {backend}\n" in text


# --- firewall counters and sets, both backends ---------------------------------------


def _nft_rule(family: str, chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {"family": family, "table": "qubes", "chain": chain, "handle": 1, "expr": list(expr)}}


def _counter(packets: int) -> dict[str, Any]:
    return {"counter": {"packets": packets, "bytes": packets * 40}}


def _saddr_in(proto: str, set_name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "saddr"}}, "right": set_name}}


def _group(key: str, group: int, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": group}}


DROP: dict[str, Any] = {"drop": None}


def _nft_ruleset(family: str, proto: str, from_vm: int, from_uplink: int, to_vm: int) -> list[dict[str, Any]]:
    """One family's table as ``nft -j list ruleset`` shows it (rules that must not count included)."""
    allowed = {"match": {"op": "==", "left": {"concat": [{"meta": {"key": "iifname"}},
                                                         {"payload": {"protocol": proto, "field": "saddr"}}]},
                         "right": "@allowed"}}
    return [
        {"table": {"family": family, "name": "qubes", "handle": 1}},
        _nft_rule(family, "prerouting", _group("iifgroup", 2), {"goto": {"target": "antispoof"}}),
        _nft_rule(family, "prerouting", _saddr_in(proto, "@downstream"), _counter(from_uplink), DROP),
        _nft_rule(family, "prerouting", _saddr_in(proto, "@downstream-nets"), _counter(1), DROP),
        _nft_rule(family, "prerouting", _saddr_in(proto, "@connected"), _counter(50), DROP),
        _nft_rule(family, "antispoof", allowed, {"accept": None}),
        _nft_rule(family, "antispoof", _counter(from_vm), DROP),
        _nft_rule(family, "forward", {"jump": {"target": "custom-forward"}}),
        _nft_rule(family, "forward", {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "invalid"}},
                  _counter(70), DROP),
        _nft_rule(family, "forward", _group("oifgroup", 2), _counter(to_vm), DROP),
        _nft_rule(family, "postrouting", _group("oifgroup", 2, "!="), _counter(80), DROP),
    ]


NFT_JSON = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
    *_nft_ruleset("ip", "ip", 3, 7, 9),
    *_nft_ruleset("ip6", "ip6", 4, 5, 6),
    # Someone else's table with the same chain names does not count.
    {"rule": {"family": "ip", "table": "other", "chain": "antispoof", "handle": 2, "expr": [_counter(99), DROP]}},
    {"set": {"family": "ip", "name": "allowed", "table": "qubes", "type": ["ifname", "ipv4_addr"], "handle": 1,
             "elem": [{"concat": ["vif11.0", "10.137.0.11"]}, {"concat": ["vif12.0", "10.137.0.12"]}]}},
    {"set": {"family": "ip", "name": "downstream-nets", "table": "qubes", "type": "ipv4_addr", "handle": 4,
             "flags": ["interval"], "elem": [{"prefix": {"addr": "10.137.1.0", "len": 24}}]}},
    {"set": {"family": "ip6", "name": "downstream", "table": "qubes", "type": "ipv6_addr", "handle": 3,
             "elem": ["fd09:24ef:4179::a89:b"]}},
    {"set": {"family": "ip", "name": "connected", "table": "qubes", "type": "ipv4_addr", "handle": 5}},
]})


def test_nft_counters_read_the_ipv4_table() -> None:
    # downstream-nets counts with downstream (a VM given a whole network).
    assert nft_drop_counters(NFT_JSON, 4) == DropCounters(forged_from_vm=3, forged_from_uplink=8, to_vm=9)


def test_nft_counters_read_the_ipv6_table() -> None:
    assert nft_drop_counters(NFT_JSON, 6) == DropCounters(forged_from_vm=4, forged_from_uplink=6, to_vm=6)


def test_nft_counters_of_an_empty_ruleset_are_zero() -> None:
    assert nft_drop_counters('{"nftables": [{"metainfo": {"version": "1.0.6"}}]}', 4) == DropCounters()


@pytest.mark.parametrize("text", ["", "table ip qubes {\n}\n", "[]"])
def test_nft_counters_refuse_anything_but_nft_json(text: str) -> None:
    with pytest.raises(ValueError):
        nft_drop_counters(text, 4)


IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9
*mangle
:POSTROUTING ACCEPT [152:9191]
[0:0] -A QBS-DOWNSTREAM-OUT -m set --match-set qbs-connected4 dst -m devgroup ! --dst-group 0x2 -j DROP
COMMIT
*filter
:INPUT DROP [0:0]
:QBS-FORWARD-BASE - [0:0]
[158:9449] -A QBS-FORWARD-BASE -j QBS-FORWARD
[11:500] -A QBS-FORWARD-BASE -m conntrack --ctstate INVALID -j DROP
[102:6412] -A QBS-FORWARD-BASE -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
[9:387] -A QBS-FORWARD-BASE -m devgroup --dst-group 0x2 -j DROP
[5:200] -A QBS-INPUT -m devgroup --src-group 0x2 -j REJECT --reject-with icmp-host-prohibited
COMMIT
*raw
:PREROUTING ACCEPT [161:9578]
:QBS-ANTISPOOF - [0:0]
[173:10094] -A PREROUTING -j QBS-ANTISPOOF
[111:6113] -A QBS-ANTISPOOF -m devgroup --src-group 0x2 -g QBS-ANTISPOOF-VIF
[7:300] -A QBS-ANTISPOOF -m set --match-set qbs-downstream4 src -j DROP
[50:2000] -A QBS-ANTISPOOF -m set --match-set qbs-connected4 src -j DROP
[102:5726] -A QBS-ANTISPOOF-VIF -m set --match-set qbs-allowed4 src,src -j RETURN
[3:84] -A QBS-ANTISPOOF-VIF -j DROP
COMMIT
"""


def test_xtables_counters_read_raw_and_filter() -> None:
    assert xtables_drop_counters(IPTABLES_SAVE, 4) == DropCounters(forged_from_vm=3, forged_from_uplink=7, to_vm=9)


def test_xtables_counters_take_the_downstream_set_of_the_family() -> None:
    text = "*raw\n[4:1] -A QBS-ANTISPOOF -m set --match-set qbs-downstream6 src -j DROP\nCOMMIT\n"
    assert xtables_drop_counters(text, 6).forged_from_uplink == 4
    assert xtables_drop_counters(text, 4).forged_from_uplink == 0


def test_xtables_counters_ignore_a_chain_of_that_name_in_another_table() -> None:
    text = "*filter\n[4:1] -A QBS-ANTISPOOF-VIF -j DROP\nCOMMIT\n*raw\n[5:1] -A QBS-FORWARD-BASE " \
           "-m devgroup --dst-group 0x2 -j DROP\nCOMMIT\n"
    assert xtables_drop_counters(text, 4) == DropCounters()


def test_xtables_counters_skip_negated_group_matches() -> None:
    text = "*filter\n[4:1] -A QBS-FORWARD-BASE -m devgroup ! --dst-group 0x2 -j DROP\nCOMMIT\n"
    assert xtables_drop_counters(text, 4).to_vm == 0


def test_counters_subtract_field_by_field() -> None:
    assert DropCounters(5, 7, 9) - DropCounters(1, 2, 3) == DropCounters(4, 5, 6)


class Recorder:
    """A ``run`` for the netvm that answers from canned output and remembers the argv."""

    def __init__(self, answers: Mapping[str, str]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(tuple(argv))
        return self.answers[argv[0]]


@pytest.mark.parametrize(
    ("backend", "family", "argv"),
    [("nftables", 4, ("/usr/sbin/nft", "-j", "list", "ruleset")),
     ("nftables", 6, ("/usr/sbin/nft", "-j", "list", "ruleset")),
     ("iptables", 4, ("/sbin/iptables-legacy-save", "-c")),
     ("iptables", 6, ("/sbin/ip6tables-legacy-save", "-c"))],
)
def test_drop_counters_ask_only_the_backend_in_use(backend: checks.Backend, family: checks.Family,
                                                   argv: tuple[str, ...]) -> None:
    tools = FirewallTools("/usr/sbin/nft", "/sbin/iptables-legacy-save", "/sbin/ip6tables-legacy-save", "/sbin/ipset")
    run = Recorder({"/usr/sbin/nft": NFT_JSON, "/sbin/iptables-legacy-save": IPTABLES_SAVE,
                    "/sbin/ip6tables-legacy-save": ""})
    drop_counters(backend, family, run, tools)
    assert run.calls == [argv]


def test_nft_set_members_of_every_qubes_set() -> None:
    assert nft_set_members(NFT_JSON) == (
        SetMember("ip allowed", "10.137.0.11", "vif11.0"),
        SetMember("ip allowed", "10.137.0.12", "vif12.0"),
        SetMember("ip downstream-nets", "10.137.1.0/24"),
        SetMember("ip6 downstream", "fd09:24ef:4179::a89:b"),
    )


IPSET_LIST = """\
Name: qbs-allowed4
Type: hash:net,iface
Members:
10.137.0.11,vif11.0
10.137.0.12,vif12.0

Name: qbs-downstream6
Type: hash:net
Members:
fd09:24ef:4179::a89:b

Name: someone-elses
Type: hash:ip
Members:
10.137.0.11
"""


def test_ipset_members_of_the_packages_sets_only() -> None:
    assert ipset_members(IPSET_LIST) == (
        SetMember("qbs-allowed4", "10.137.0.11", "vif11.0"),
        SetMember("qbs-allowed4", "10.137.0.12", "vif12.0"),
        SetMember("qbs-downstream6", "fd09:24ef:4179::a89:b"),
    )


@pytest.mark.parametrize(("backend", "tool"), [("nftables", "nft"), ("iptables", "ipset")])
def test_set_members_ask_only_the_backend_in_use(backend: checks.Backend, tool: str) -> None:
    run = Recorder({"nft": NFT_JSON, "ipset": IPSET_LIST})
    assert set_members(backend, run)
    assert [c[0] for c in run.calls] == [tool]


@pytest.mark.parametrize(
    ("member", "mentions"),
    [(SetMember("s", "10.137.0.11", "vif11.0"), True), (SetMember("s", "10.137.0.12", "vif11.0"), True),
     (SetMember("s", "10.137.0.12", "vif12.0"), False), (SetMember("s", "10.137.0.11"), True),
     (SetMember("s", "10.137.0.11/32"), True), (SetMember("s", "10.137.0.110"), False),
     (SetMember("s", "10.137.0.0/24"), False)],
)
def test_member_mentions_address_or_device(member: SetMember, mentions: bool) -> None:
    assert member_mentions(member, IPv4Address("10.137.0.11"), "vif11.0") is mentions


# --- other parsers -----------------------------------------------------------------------


def test_dig_answers_skip_comments() -> None:
    assert dig_answers(";; connection timed out; no servers could be reached\n") == ()
    assert dig_answers("203.0.113.1\n") == ("203.0.113.1",)


def test_route_destinations_first_words() -> None:
    text = "default via 192.0.2.1 dev uplink0\n10.137.0.11 dev vif11.0 scope link metric 32741\n"
    assert route_destinations(text) == ("default", "10.137.0.11")


def test_addresses_of_reads_both_families() -> None:
    text = ("5: vif11.0    inet 10.137.0.1/32 scope global vif11.0\\       valid_lft forever\n"
            "5: vif11.0    inet6 fd09:24ef:4179::a89:1/128 scope global \\       valid_lft forever\n")
    assert addresses_of(text) == ("10.137.0.1/32", "fd09:24ef:4179::a89:1/128")


# --- probes --------------------------------------------------------------------------------


def test_probe_runs_as_a_module_of_the_lab_package() -> None:
    assert probe.command("ping", "x", python="/py") == ("/py", "-m", "vif_hotplug.lab.probe", "ping", "x")


def test_send_udp_argv_sends_three_unless_told() -> None:
    assert probe.send_udp_argv("10.0.0.1", "10.0.0.2", 5, "t", python="/py")[-2:] == ("--count", "3")
    assert probe.send_udp_argv("10.0.0.1", "10.0.0.2", 5, "t", count=1, python="/py")[-2:] == ("--count", "1")


@pytest.mark.parametrize(
    ("kwargs", "tail"),
    [({"token": "t"}, ("listen-udp", "5", "t")),
     ({"bind": "10.0.0.1", "log": "/tmp/f"}, ("listen-udp", "5", "--bind", "10.0.0.1", "--log", "/tmp/f"))],
)
def test_listen_udp_argv(kwargs: dict[str, str], tail: tuple[str, ...]) -> None:
    argv = probe.listen_udp_argv(5, python="/py", **kwargs)  # type: ignore[arg-type]
    assert argv[3:] == tail


def test_every_probe_argv_parses() -> None:
    parser = probe.build_parser()
    for argv in (probe.send_udp_argv("::1", "::1", 5, "t", count=1), probe.listen_udp_argv(5, "t"),
                 probe.listen_udp_argv(5, bind="::1", log="/tmp/f")):
        parser.parse_args(list(argv[3:]))


def test_listen_udp_without_token_or_log_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        probe.run(["listen-udp", "5000"])
    assert exc.value.code == 2
    assert "TOKEN" in capsys.readouterr().err


def test_icmp_checksum_of_a_known_header() -> None:
    # Echo request, id 1, seq 1, no payload: 0x0800 + 0x0001 + 0x0001 summed and inverted.
    assert probe._checksum(bytes.fromhex("0800000000010001")) == 0xF7FD


# --- checks against a fake network ------------------------------------------------------------


class FakeListener:
    def __init__(self, arrived: int) -> None:
        self.stdout = self
        self.arrived = arrived
        self.returncode: int | None = None

    def readline(self) -> str:
        return "ready\n"

    def communicate(self, input: str = "", timeout: float | None = None) -> tuple[str, str]:
        self.returncode = 0
        return f"{self.arrived}\n", ""

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9

    def wait(self) -> int:
        return self.returncode or 0


class FakeNetwork:
    """A lab whose VM-to-VM datagrams arrive ``arrived`` times and are counted as dropped
    ``dropped`` times by the netvm's forward chain, while ``control`` reach the uplink."""

    def __init__(self, arrived: int, dropped: int, control: int) -> None:
        self.arrived, self.dropped, self.control = arrived, dropped, control
        self.forward_drops = 0
        self.where: list[str] = []

    def run(self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        self.where.append(ns)
        out = ""
        if argv[:2] == ("nft", "-j"):
            out = json.dumps({"nftables": _nft_ruleset("ip", "ip", 0, 0, self.forward_drops)})
        elif "send-udp" in argv and argv[argv.index("send-udp") + 2].startswith("10.137.0."):
            self.forward_drops += self.dropped
        elif "query" in argv:
            out = f"{self.control}\n"
        return subprocess.CompletedProcess(list(argv), 0, out, "")

    def popen(self, ns: str, argv: Sequence[str]) -> Any:
        self.where.append(ns)
        return FakeListener(self.arrived)


def _checker(net: FakeNetwork) -> tuple[Checker, Any]:
    topo = plan_topology("x", 2, False)
    tools = Tools("ip", "dnsmasq", "dig", "vif-hotplug", "vif-route-qubes", "qubes-setup-dnat-to-ns")
    return Checker(topo, net, tools, "nftables", lambda: "token"), topo


@pytest.fixture
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    def once(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 0) -> Any:
        return read()

    monkeypatch.setattr(checks, "poll", once)


@pytest.mark.usefixtures("no_waiting")
def test_no_vm_to_vm_passes_with_drop_evidence_and_control() -> None:
    checker, topo = _checker(FakeNetwork(arrived=0, dropped=3, control=3))
    result = checker.no_vm_to_vm(topo.vms[0], topo.vms[1])
    assert result.ok, result.detail


@pytest.mark.usefixtures("no_waiting")
@pytest.mark.parametrize(
    ("arrived", "dropped", "control"),
    [(3, 3, 3), (0, 0, 3), (0, 3, 0)],
    ids=["packets-arrived", "no-drop-counted", "control-lost"],
)
def test_no_vm_to_vm_fails_without_each_piece_of_evidence(arrived: int, dropped: int, control: int) -> None:
    checker, topo = _checker(FakeNetwork(arrived, dropped, control))
    assert not checker.no_vm_to_vm(topo.vms[0], topo.vms[1]).ok


@pytest.mark.usefixtures("no_waiting")
def test_checks_run_only_inside_lab_namespaces() -> None:
    net = FakeNetwork(0, 3, 3)
    checker, topo = _checker(net)
    checker.no_vm_to_vm(topo.vms[0], topo.vms[1])
    assert net.where and set(net.where) <= set(topo.namespaces)


# --- reporting ---------------------------------------------------------------------

ROWS = [CheckResult("ping uplink", "vm11", True, "answered"), CheckResult("no vm-to-vm", "vm11", False, "answered")]


def test_table_ends_with_pass_fail_summary() -> None:
    lines = format_table(ROWS).splitlines()
    assert lines[-1] == "1 passed, 1 failed"
    assert lines[2].startswith("FAIL")


def test_json_is_a_list_of_check_vm_ok_detail() -> None:
    assert json.loads(to_json(ROWS))[1] == {"check": "no vm-to-vm", "vm": "vm11", "ok": False, "detail": "answered"}


# --- the runner: what it passes to the tools ---------------------------------------------


class ToolShell:
    """Records what the lab runs in the netvm; every tool succeeds."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...], dict[str, str]]] = []

    def run(self, ns: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        self.calls.append((ns, tuple(argv), dict(env or {})))
        return subprocess.CompletedProcess(list(argv), 0, "", "")


@pytest.mark.parametrize("backend", ["auto", "nftables", "iptables"])
def test_init_gets_the_backend_and_a_private_state_dir(backend: str, tmp_path: Path) -> None:
    topo = plan_topology("x", 1, False)
    tools = Tools("ip", "dnsmasq", "dig", "/venv/vif-hotplug", "vif-route-qubes", "qubes-setup-dnat-to-ns")
    lab = runner.Lab(topo, tools, runner.LabState("x", str(tmp_path)), {"PATH": "/bin"}, backend, "nftables")
    shell = ToolShell()
    lab.shell = shell  # type: ignore[assignment]
    assert lab.init().ok
    ((ns, argv, env),) = shell.calls
    assert ns == topo.netvm_ns
    assert argv == ("/venv/vif-hotplug", "init", "--backend", backend)
    assert env["VIF_HOTPLUG_STATE_DIR"] == f"{tmp_path}/state"
    assert env["VIF_HOTPLUG_AGENT"] == "off"


# --- refusals and state -----------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_package_logger() -> Iterator[None]:
    # runner.run() configures the package logger as an entry point does; undo it for the next test.
    pkg = logging.getLogger("vif_hotplug")
    saved = list(pkg.handlers), pkg.propagate, pkg.level
    yield
    pkg.handlers[:], pkg.propagate = saved[0], saved[1]
    pkg.setLevel(saved[2])


def test_lab_refuses_without_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert runner.run([], env={}) == 1
    assert "root" in capsys.readouterr().err


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.run(["--backend", "pf"], env={}) == 2
    assert "--backend" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("backend", "tool", "package"),
    [("nftables", "dnsmasq", "dnsmasq-base"), ("nftables", "dig", "dnsutils"), ("nftables", "ip", "iproute2"),
     ("nftables", "nft", "nftables"), ("iptables", "ipset", "ipset"),
     ("iptables", "iptables-legacy-save", "iptables"), ("iptables", "ip6tables-legacy-save", "iptables")],
)
def test_missing_tool_names_its_debian_package(
    monkeypatch: pytest.MonkeyPatch, backend: runner.BackendName, tool: str, package: str
) -> None:
    real = runner.find_program
    monkeypatch.setattr(runner, "find_program", lambda name, path: None if name == tool else real(name, path))
    tools, missing = runner.find_tools({"PATH": os.environ.get("PATH", "")}, backend)
    assert tools is None
    assert f"{tool} (Debian package {package})" in missing


@pytest.mark.parametrize(("backend", "other_tool"), [("nftables", "ipset"), ("iptables", "nft")])
def test_tools_of_the_other_backend_are_not_required(
    monkeypatch: pytest.MonkeyPatch, backend: runner.BackendName, other_tool: str
) -> None:
    real = runner.find_program
    monkeypatch.setattr(runner, "find_program", lambda name, path: None if name == other_tool else real(name, path))
    _, missing = runner.find_tools({"PATH": os.environ.get("PATH", "")}, backend)
    assert not [m for m in missing if m.startswith(f"{other_tool} ")]


def test_down_without_any_lab_succeeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "STATE_DIR", str(tmp_path / "state"))
    assert runner.down("", "ip") == 0


def test_down_of_unknown_lab_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "STATE_DIR", str(tmp_path))
    assert runner.down("nosuch", "ip") == 1


def test_down_without_id_refuses_to_choose_between_labs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "STATE_DIR", str(tmp_path))
    runner.LabState("aaaaaa").save()
    runner.LabState("bbbbbb").save()
    assert runner.down("", "ip") == 2


def test_state_round_trips(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(runner, "STATE_DIR", str(tmp_path))
    state = runner.LabState("abc123", "/tmp/x", ["vhlab-abc123-up"], ["/etc/netns/vhlab-abc123-up"],
                            [{"pid": 1, "start": 2, "what": "dnsmasq-a"}])
    state.save()
    assert runner.LabState.load(runner.LabState.path_for("abc123")) == state


def test_stop_process_spares_a_process_that_is_not_the_recorded_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = runner.process_start_time(child.pid)
        assert start is not None
        runner.stop_process(child.pid, start + 1, "impostor")
        assert child.poll() is None
        runner.stop_process(child.pid, start, "child")
        assert child.poll() is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_process_start_time_of_a_missing_process_is_none() -> None:
    assert runner.process_start_time(2**22 + 1) is None


def test_a_signal_inside_a_deferred_section_interrupts_right_after_it() -> None:
    guard = runner._SignalGuard()
    done: list[str] = []
    with pytest.raises(runner.Interrupted, match="SIGTERM"), guard.deferred():
        guard.handler(signal.SIGTERM, None)
        done.append("child recorded")
    assert done == ["child recorded"]


def test_sigint_outside_a_deferred_section_interrupts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt):
        runner._SignalGuard().handler(signal.SIGINT, None)


def test_sigterm_while_a_log_line_is_written_still_interrupts(monkeypatch: pytest.MonkeyPatch) -> None:
    class SignalsWhileWriting:
        def write(self, text: str) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

        def flush(self) -> None:
            pass

    logger = logging.getLogger("vif_hotplug.test.interrupted")
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(SignalsWhileWriting())])
    monkeypatch.setattr(logger, "propagate", False)
    with pytest.raises(runner.Interrupted, match="SIGTERM"), runner._signals_raise():
        logger.error("started xenstored")
        for _ in range(1000):  # the Python-level handler runs at the next bytecode boundary
            pass
