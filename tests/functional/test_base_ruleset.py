"""``vif-hotplug init`` as installed, run inside fresh network namespaces.

Every namespace starts with empty tables, so what init leaves behind is read
back with ``iptables-legacy-save`` / ``ip6tables-legacy-save`` and compared
without counters and comments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.functional.conftest import Netns, NetnsFactory, entry_point, require_tool

pytestmark = pytest.mark.netns

IPV6_ON = "[netvm]\ngateway = 10.137.0.1\ngateway6 = fd09:24ef:4179::a89:1\nprimary_dns = 10.139.1.1\n"
IPV6_OFF = "[netvm]\ngateway = 10.137.0.1\nprimary_dns = 10.139.1.1\n"

#: Rules someone else put there before init ran: (save command, table, iptables args).
FOREIGN_BUILTIN = (
    ("iptables-legacy", "filter", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"),
    ("iptables-legacy", "filter", "-A FORWARD -s 198.51.100.0/24 -j ACCEPT"),
    ("iptables-legacy", "nat", "-A POSTROUTING -s 198.51.100.0/24 -j RETURN"),
    ("ip6tables-legacy", "filter", "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"),
)
FOREIGN_RESERVED = (
    ("iptables-legacy", "filter", "QBS-FORWARD", "-A QBS-FORWARD -d 198.51.100.7/32 -j DROP"),
    ("iptables-legacy", "filter", "QBS-INPUT-ADMIN", "-A QBS-INPUT-ADMIN -p tcp -m tcp --dport 8080 -j ACCEPT"),
    ("iptables-legacy", "nat", "PR-QBS", "-A PR-QBS -d 10.139.1.1/32 -p udp -m udp --dport 53 -j DNAT "
     "--to-destination 192.0.2.53"),
    ("iptables-legacy", "nat", "PR-QBS-SERVICES", "-A PR-QBS-SERVICES -p tcp -m tcp --dport 80 -j ACCEPT"),
    ("ip6tables-legacy", "filter", "QBS-FORWARD", "-A QBS-FORWARD -d fd00::7/128 -j DROP"),
)


@pytest.fixture
def netvm(make_netns: NetnsFactory, tmp_path: Path) -> Callable[[str], Netns]:
    """A fresh namespace whose tools see ``conf`` as netvm.conf and a private xtables lock."""
    require_tool("iptables-legacy-save")

    def make(conf: str) -> Netns:
        (tmp_path / "netvm.conf").write_text(conf)
        ns = make_netns("vhinit")
        ns.env.update(
            VIF_HOTPLUG_CONF=str(tmp_path / "netvm.conf"),
            XTABLES_LOCKFILE=str(tmp_path / "xtables.lock"),
            XENSTORED_PATH=str(tmp_path / "no-xenstore"),
        )
        return ns

    return make


def init(ns: Netns, *args: str) -> str:
    """Run the installed ``vif-hotplug init`` in ``ns``; returns its stderr."""
    return ns.run(entry_point("vif-hotplug"), "init", *args).stderr


def saved(ns: Netns) -> str:
    """Both families' rules, without counters or comments: what init is judged by."""
    out = []
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save"):
        text = ns.run(tool).stdout
        out += [line.split(" [", 1)[0] if line.startswith(":") else line
                for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(out)


def sysctl(ns: Netns, key: str) -> str:
    return ns.run("cat", f"/proc/sys/{key}").stdout.strip()


@pytest.mark.parametrize("conf", [IPV6_ON, IPV6_OFF], ids=["ipv6-on", "ipv6-off"])
def test_second_init_leaves_the_same_rules(netvm: Callable[[str], Netns], conf: str) -> None:
    ns = netvm(conf)
    init(ns)
    once = saved(ns)
    init(ns)
    assert saved(ns) == once


@pytest.mark.parametrize("conf", [IPV6_ON, IPV6_OFF], ids=["ipv6-on", "ipv6-off"])
def test_second_init_reports_no_change(netvm: Callable[[str], Netns], conf: str) -> None:
    ns = netvm(conf)
    init(ns)
    assert "nothing changed" in init(ns, "-v")


def test_init_with_ipv6_off_drops_ip6_forwarding(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_OFF)
    init(ns)
    rules = ns.run("ip6tables-legacy-save", "-t", "filter").stdout
    assert ":FORWARD DROP" in rules
    assert "-A QBS-FORWARD-BASE -j DROP" in rules


def test_init_with_ipv6_on_masquerades_ipv6(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_ON)
    init(ns)
    assert "-A QBS-POSTROUTING -j MASQUERADE" in ns.run("ip6tables-legacy-save", "-t", "nat").stdout


def test_init_switches_ipv4_forwarding_on(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_OFF)
    init(ns)
    assert sysctl(ns, "net/ipv4/ip_forward") == "1"


@pytest.mark.parametrize(("conf", "want"), [(IPV6_ON, "1"), (IPV6_OFF, "0")], ids=["ipv6-on", "ipv6-off"])
def test_init_switches_ipv6_forwarding_only_when_ipv6_is_on(
    netvm: Callable[[str], Netns], conf: str, want: str
) -> None:
    ns = netvm(conf)
    init(ns)
    assert sysctl(ns, "net/ipv6/conf/all/forwarding") == want


def test_init_creates_the_anti_spoofing_sets(netvm: Callable[[str], Netns]) -> None:
    require_tool("ipset")
    ns = netvm(IPV6_OFF)
    init(ns)
    names = set(ns.run("ipset", "list", "-n").stdout.split())
    assert {"qbs-allowed4", "qbs-downstream4", "qbs-allowed6", "qbs-downstream6"} <= names


@pytest.mark.parametrize(("tool", "table", "rule"), FOREIGN_BUILTIN, ids=[r[2] for r in FOREIGN_BUILTIN])
def test_foreign_rules_in_builtin_chains_survive(
    netvm: Callable[[str], Netns], tool: str, table: str, rule: str
) -> None:
    ns = netvm(IPV6_ON)
    ns.run(tool, "-t", table, *rule.split())
    init(ns)
    init(ns)
    assert rule in ns.run(f"{tool}-save", "-t", table).stdout


@pytest.mark.parametrize(("tool", "table", "chain", "rule"), FOREIGN_RESERVED, ids=[r[2] for r in FOREIGN_RESERVED])
def test_rules_in_reserved_chains_survive(
    netvm: Callable[[str], Netns], tool: str, table: str, chain: str, rule: str
) -> None:
    ns = netvm(IPV6_ON)
    ns.run(tool, "-t", table, "-N", chain)
    ns.run(tool, "-t", table, *rule.split())
    init(ns)
    init(ns)
    assert rule in ns.run(f"{tool}-save", "-t", table).stdout


def test_builtin_chains_jump_to_init_chains_first(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_OFF)
    ns.run("iptables-legacy", "-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "ACCEPT")
    init(ns)
    forward = [line for line in ns.run("iptables-legacy-save", "-t", "filter").stdout.splitlines()
               if line.startswith("-A FORWARD ")]
    assert forward[:2] == ["-A FORWARD -j QBS-DNS", "-A FORWARD -j QBS-FORWARD-BASE"]


def test_dry_run_changes_nothing(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_ON)
    before = saved(ns), sysctl(ns, "net/ipv4/ip_forward")
    out = ns.run(entry_point("vif-hotplug"), "init", "--dry-run").stdout
    assert "-A QBS-FORWARD-BASE" in out
    assert (saved(ns), sysctl(ns, "net/ipv4/ip_forward")) == before


def test_dns_guard_stays_above_the_forward_base_when_the_dns_tool_ran_first(netvm: Callable[[str], Netns]) -> None:
    ns = netvm(IPV6_OFF)
    ns.run(entry_point("qubes-setup-dnat-to-ns"), "--resolv-conf", "/dev/null", check=False)
    init(ns)
    forward = [line for line in ns.run("iptables-legacy-save", "-t", "filter").stdout.splitlines()
               if line.startswith("-A FORWARD")]
    assert forward[:2] == ["-A FORWARD -j QBS-DNS", "-A FORWARD -j QBS-FORWARD-BASE"]
