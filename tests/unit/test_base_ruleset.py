"""The base ruleset planner and the small pieces of ``vif-hotplug init`` that need no root."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from vif_hotplug import base_ruleset
from vif_hotplug.base_ruleset import (
    SysctlWrite,
    ensure_sysctl,
    kernel_has_ipv6,
    plan_base,
    plan_base_ruleset,
)
from vif_hotplug.errors import KernelError
from vif_hotplug.firewall import ChainSpec, Rule, Ruleset
from vif_hotplug.iptables_backend import FamilyIsolatedFirewall, split_by_family

BUILTIN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}
RESERVED = {"PR-QBS", "PR-QBS-SERVICES", "QBS-FORWARD", "QBS-INPUT-ADMIN", "QBS-DNS"}


def chain(rs: Ruleset, family: int, table: str, name: str) -> ChainSpec:
    found = [c for c in rs.chains if (c.family, c.table, c.name) == (family, table, name)]
    assert len(found) == 1, f"{family} {table} {name}: {len(found)} specs"
    return found[0]


def rules(rs: Ruleset, family: int, table: str, name: str) -> list[str]:
    return [r.text for r in chain(rs, family, table, name).rules]


def hook_targets(rs: Ruleset, family: int, table: str, builtin: str) -> list[str]:
    return [h.rule.text for h in sorted(rs.hooks, key=lambda h: h.position)
            if (h.family, h.table, h.chain) == (family, table, builtin)]


def families(rs: Ruleset) -> set[int]:
    return {c.family for c in rs.chains} | {h.family for h in rs.hooks} | {p.family for p in rs.policies}


# --- shape of the plan --------------------------------------------------------------


@pytest.mark.parametrize("ipv6", [True, False])
def test_kernel_without_ipv6_gets_no_ip6_rules(ipv6: bool) -> None:
    assert families(plan_base_ruleset(ipv6, ipv6_in_kernel=False)) == {4}


@pytest.mark.parametrize(("ipv6", "in_kernel"), [(True, True), (False, True), (False, False)])
def test_no_builtin_chain_is_owned(ipv6: bool, in_kernel: bool) -> None:
    # An owned chain is flushed and refilled: a builtin one must never be.
    rs = plan_base_ruleset(ipv6, in_kernel)
    assert not [c for c in rs.chains if c.name in BUILTIN]


@pytest.mark.parametrize(("ipv6", "in_kernel"), [(True, True), (False, True), (False, False)])
def test_builtin_chains_only_get_jumps_to_planned_chains(ipv6: bool, in_kernel: bool) -> None:
    rs = plan_base_ruleset(ipv6, in_kernel)
    planned = {(c.family, c.table, c.name) for c in rs.chains}
    for h in rs.hooks:
        words = h.rule.text.split()
        assert words[:1] == ["-j"] and len(words) == 2, h
        assert (h.family, h.table, words[1]) in planned, h


@pytest.mark.parametrize("ipv6", [True, False])
def test_reserved_chains_are_not_owned(ipv6: bool) -> None:
    rs = plan_base_ruleset(ipv6)
    reserved = [c for c in rs.chains if c.name in RESERVED]
    assert reserved
    assert all(not c.owned and c.rules == () for c in reserved)


def test_reserved_chains_exist_in_both_families_when_ipv6_is_on() -> None:
    rs = plan_base_ruleset(True)
    names = {(c.family, c.table, c.name) for c in rs.chains if not c.owned}
    assert names == {
        (4, "nat", "PR-QBS"), (4, "nat", "PR-QBS-SERVICES"), (6, "nat", "PR-QBS-SERVICES"),
        (4, "filter", "QBS-INPUT-ADMIN"), (4, "filter", "QBS-FORWARD"), (4, "filter", "QBS-DNS"),
        (6, "filter", "QBS-INPUT-ADMIN"), (6, "filter", "QBS-FORWARD"),
    }


def test_dns_guard_is_jumped_above_the_forward_base_whichever_tool_runs_first() -> None:
    rs = plan_base_ruleset(False)
    hooks = [(h.rule.text, h.position) for h in rs.hooks if h.chain == "FORWARD" and h.family == 4]
    assert hooks == [("-j QBS-DNS", 1), ("-j QBS-FORWARD-BASE", 2)]


@pytest.mark.parametrize("ipv6", [True, False])
def test_chains_are_declared_before_chains_that_jump_to_them(ipv6: bool) -> None:
    rs = plan_base_ruleset(ipv6)
    seen: set[tuple[int, str, str]] = set()
    for c in rs.chains:
        for r in c.rules:
            target = r.text.split()[-1] if r.text.split()[-2] == "-j" else ""
            if target.startswith(("QBS-", "PR-QBS")):
                assert (c.family, c.table, target) in seen, f"{c.name} jumps to {target} before it is declared"
        seen.add((c.family, c.table, c.name))


def test_plan_is_deterministic() -> None:
    assert plan_base(True) == plan_base(True)
    assert plan_base_ruleset(False) == plan_base_ruleset(False)


def test_policies_drop_input_and_forward_in_both_families() -> None:
    for ipv6 in (True, False):
        pols = {(p.family, p.table, p.chain, p.target) for p in plan_base_ruleset(ipv6).policies}
        assert pols == {(f, "filter", c, "DROP") for f in (4, 6) for c in ("INPUT", "FORWARD")}


# --- IPv4 ----------------------------------------------------------------------


def test_nat_prerouting_jumps_to_dns_chain_then_services() -> None:
    assert hook_targets(plan_base_ruleset(False), 4, "nat", "PREROUTING") == ["-j PR-QBS", "-j PR-QBS-SERVICES"]


def test_postrouting_masquerades_all_but_vm_and_loopback_traffic() -> None:
    rs = plan_base_ruleset(False)
    assert hook_targets(rs, 4, "nat", "POSTROUTING") == ["-j QBS-POSTROUTING"]
    assert rules(rs, 4, "nat", "QBS-POSTROUTING") == [
        "-m devgroup --dst-group 0x2 -j ACCEPT",
        "-o lo -j ACCEPT",
        "-j MASQUERADE",
    ]


def test_ipv4_input_follows_qubes_order() -> None:
    assert rules(plan_base_ruleset(False), 4, "filter", "QBS-INPUT") == [
        "-m conntrack --ctstate INVALID -j DROP",
        "-p udp -m devgroup --src-group 0x2 -m udp --dport 67 -j DROP",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-j QBS-INPUT-ADMIN",
        "-p icmp -m devgroup --src-group 0x2 -j ACCEPT",
        "-i lo -j ACCEPT",
        "-m devgroup --src-group 0x2 -j REJECT --reject-with icmp-host-prohibited",
    ]


def test_ipv4_forward_drops_vm_to_vm_before_accepting_from_vms() -> None:
    assert rules(plan_base_ruleset(False), 4, "filter", "QBS-FORWARD-BASE") == [
        "-m conntrack --ctstate INVALID -j DROP",
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-j QBS-FORWARD",
        "-m devgroup --src-group 0x2 --dst-group 0x2 -j DROP",
        "-m devgroup --src-group 0x2 -j ACCEPT",
    ]


def test_anti_spoofing_is_part_of_the_plan() -> None:
    plan = plan_base(False)
    assert {s.name for s in plan.sets} == {"qbs-allowed4", "qbs-downstream4", "qbs-allowed6", "qbs-downstream6"}
    assert {c.family for c in plan.ruleset.chains if c.name == "QBS-ANTISPOOF"} == {4, 6}


def test_ipv4_forwarding_is_switched_on() -> None:
    assert SysctlWrite("net/ipv4/ip_forward", "1") in plan_base(False).sysctls


# --- IPv6 on ---------------------------------------------------------------------


def test_ipv6_on_masquerades_like_ipv4() -> None:
    rs = plan_base_ruleset(True)
    assert rules(rs, 6, "nat", "QBS-POSTROUTING") == rules(rs, 4, "nat", "QBS-POSTROUTING")


def test_ipv6_on_has_no_dns_chain() -> None:
    # DNS is IPv4 only (README §6).
    assert not [c for c in plan_base_ruleset(True).chains if c.family == 6 and c.name == "PR-QBS"]


def test_ipv6_on_accepts_neighbour_discovery() -> None:
    got = rules(plan_base_ruleset(True), 6, "filter", "QBS-INPUT")
    for icmp_type in (133, 134, 135, 136):
        assert f"-p icmpv6 -m icmp6 --icmpv6-type {icmp_type} -j ACCEPT" in got


def test_ipv6_on_accepts_dhcpv6_replies_to_the_netvm_only_from_its_uplink() -> None:
    got = rules(plan_base_ruleset(True), 6, "filter", "QBS-INPUT")
    assert "-d fe80::/64 -p udp -m devgroup ! --src-group 0x2 -m udp --dport 546 -j ACCEPT" in got


@pytest.mark.parametrize("icmp_type", [134, 137])
def test_ipv6_on_drops_router_advertisements_and_redirects_from_vms_first(icmp_type: int) -> None:
    got = rules(plan_base_ruleset(True), 6, "filter", "QBS-INPUT")
    drop = f"-p icmpv6 -m devgroup --src-group 0x2 -m icmp6 --icmpv6-type {icmp_type} -j DROP"
    assert drop in got
    assert got.index(drop) < min(i for i, r in enumerate(got) if r.endswith("ACCEPT"))


def test_ipv6_on_forward_matches_ipv4() -> None:
    rs = plan_base_ruleset(True)
    assert rules(rs, 6, "filter", "QBS-FORWARD-BASE") == rules(rs, 4, "filter", "QBS-FORWARD-BASE")


def test_ipv6_on_switches_ipv6_forwarding_on() -> None:
    assert SysctlWrite("net/ipv6/conf/all/forwarding", "1") in plan_base(True).sysctls


# --- IPv6 off --------------------------------------------------------------------


def test_ipv6_off_forwards_nothing() -> None:
    assert rules(plan_base_ruleset(False), 6, "filter", "QBS-FORWARD-BASE") == ["-j DROP"]


def test_ipv6_off_accepts_only_loopback_input() -> None:
    assert rules(plan_base_ruleset(False), 6, "filter", "QBS-INPUT") == ["-i lo -j ACCEPT"]


def test_ipv6_off_plans_no_ip6_nat() -> None:
    assert not [c for c in plan_base_ruleset(False).chains if c.family == 6 and c.table == "nat"]


def test_ipv6_off_leaves_ipv6_forwarding_sysctl_alone() -> None:
    assert [s.key for s in plan_base(False).sysctls] == ["net/ipv4/ip_forward"]


def test_dry_run_lines_show_every_part() -> None:
    text = "\n".join(plan_base(True).lines())
    for needle in ("ipset create qbs-allowed6", "ip6tables -t nat -A QBS-POSTROUTING -j MASQUERADE",
                   "iptables -t filter -P FORWARD DROP", "sysctl net.ipv6.conf.all.forwarding=1"):
        assert needle in text


# --- helpers ---------------------------------------------------------------------


def test_split_by_family_partitions_the_ruleset() -> None:
    rs = plan_base_ruleset(True)
    parts = split_by_family(rs)
    assert sorted(parts) == [4, 6]
    assert sorted(c for p in parts.values() for c in p.chains) == sorted(rs.chains)
    assert all(families(p) == {f} for f, p in parts.items())


class _Fake:
    def __init__(self, result: bool | Exception) -> None:
        self.result = result

    def sync(self, ruleset: Ruleset) -> bool:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize("changed", [True, False])
def test_family_isolated_firewall_reports_the_childs_answer(changed: bool) -> None:
    rs = Ruleset(chains=(ChainSpec(4, "filter", "X", (Rule("-j DROP"),)),))
    assert FamilyIsolatedFirewall(lambda: _Fake(changed)).sync(rs) is changed


def test_family_isolated_firewall_raises_the_childs_error() -> None:
    rs = Ruleset(chains=(ChainSpec(6, "filter", "X", (Rule("-j DROP"),)),))
    with pytest.raises(KernelError, match="commit refused"):
        FamilyIsolatedFirewall(lambda: _Fake(KernelError("commit refused"))).sync(rs)


def test_ensure_sysctl_writes_once(tmp_path: Path) -> None:
    (tmp_path / "net" / "ipv4").mkdir(parents=True)
    (tmp_path / "net" / "ipv4" / "ip_forward").write_text("0\n")
    write = SysctlWrite("net/ipv4/ip_forward", "1")
    assert ensure_sysctl(write, str(tmp_path)) is True
    assert ensure_sysctl(write, str(tmp_path)) is False
    assert (tmp_path / "net" / "ipv4" / "ip_forward").read_text() == "1"


def test_ensure_sysctl_names_a_missing_key(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match=r"net\.ipv4\.ip_forward"):
        ensure_sysctl(SysctlWrite("net/ipv4/ip_forward", "1"), str(tmp_path))


def test_kernel_has_ipv6_follows_proc_sys(tmp_path: Path) -> None:
    assert kernel_has_ipv6(str(tmp_path)) is False
    (tmp_path / "net" / "ipv6").mkdir(parents=True)
    assert kernel_has_ipv6(str(tmp_path)) is True


# --- entry point (dry run only: no root) ---------------------------------------------


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    # run() configures the root logger as an entry point does; undo it for the next test.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _conf(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "netvm.conf"
    path.write_text(text)
    return {"VIF_HOTPLUG_CONF": str(path)}


def test_dry_run_prints_ip6_nat_when_conf_has_gateway6(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = _conf(tmp_path, "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09:24ef:4179::a89:1\n")
    assert base_ruleset.run(["--dry-run"], env=env) == 0
    out = capsys.readouterr().out
    assert ("ip6tables -t nat -A QBS-POSTROUTING -j MASQUERADE" in out) is kernel_has_ipv6()


def test_ipv6_override_off_in_conf_closes_ipv6(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = _conf(tmp_path, "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09:24ef:4179::a89:1\nipv6 = 0\n")
    assert base_ruleset.run(["--dry-run"], env=env) == 0
    assert "ip6tables -t nat" not in capsys.readouterr().out


def test_invalid_conf_plans_ipv6_off_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = _conf(tmp_path, "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09:24ef:4179::a89:1\nipv6 = maybe\n")
    assert base_ruleset.run(["--dry-run"], env=env) == 1
    out = capsys.readouterr().out
    assert "ip6tables -t nat" not in out
    assert "iptables -t filter -P FORWARD DROP" in out


def test_usage_error_returns_2() -> None:
    assert base_ruleset.run(["--no-such-option"], env={}) == 2
