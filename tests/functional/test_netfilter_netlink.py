"""The library-free netfilter requests of the hot path, against the real kernel in a throw-away namespace.

Each check runs in a child process inside the namespace (the sockets belong
to the namespace they are opened in) and is compared with what ``nft``,
``ipset``, ``iptables-legacy`` and ``conntrack`` say.
"""

from __future__ import annotations

import json
import sys

from .conftest import Netns, require_tool

QUBES_SETS = """
nft add table ip qubes
nft add set ip qubes allowed '{ type ifname . ipv4_addr; }'
nft add set ip qubes downstream '{ type ipv4_addr; }'
nft add table ip6 qubes
nft add set ip6 qubes allowed '{ type ifname . ipv6_addr; }'
"""


def _in(ns: Netns, code: str) -> object:
    out = ns.run(sys.executable, "-c", "import json\n" + code).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_nftables_elements_are_added_looked_up_and_removed_as_nft_lists_them(netns: Netns) -> None:
    require_tool("nft")
    netns.sh(QUBES_SETS)
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl, nft_key
n = Nfnl()
k4, k6, d = nft_key("10.137.0.5", "vif5.0"), nft_key("fd09:24ef:4179::a89:5", "vif5.0"), nft_key("10.137.0.5")
r = [n.nft_element("get", 4, "qubes", "allowed", k4), n.nft_element("add", 4, "qubes", "allowed", k4),
     n.nft_element("add", 4, "qubes", "allowed", k4), n.nft_element("get", 4, "qubes", "allowed", k4),
     n.nft_element("add", 6, "qubes", "allowed", k6), n.nft_element("add", 4, "qubes", "downstream", d)]
print(json.dumps(r))
""")
    assert got == [False, True, False, True, True, True]
    listed = netns.sh("nft -j list table ip qubes; nft -j list table ip6 qubes").stdout
    assert '{"concat": ["vif5.0", "10.137.0.5"]}' in listed
    assert '{"concat": ["vif5.0", "fd09:24ef:4179::a89:5"]}' in listed
    assert '"elem": ["10.137.0.5"]' in listed
    gone = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl, nft_key
n = Nfnl()
k4 = nft_key("10.137.0.5", "vif5.0")
print(json.dumps([n.nft_element("del", 4, "qubes", "allowed", k4), n.nft_element("del", 4, "qubes", "allowed", k4),
                  n.nft_element("get", 4, "qubes", "nosuchset", k4)]))
""")
    assert gone == [True, False, False]
    assert "vif5.0" not in netns.sh("nft -j list set ip qubes allowed").stdout


def test_every_committed_transaction_moves_the_nftables_generation_by_one(netns: Netns) -> None:
    require_tool("nft")
    netns.sh(QUBES_SETS)
    got = _in(netns, """
import subprocess
from vif_hotplug.kernel.nfnl import Nfnl, nft_key
n = Nfnl()
a = n.nft_genid()
n.nft_element("add", 4, "qubes", "downstream", nft_key("10.137.0.9"))
b = n.nft_genid()
n.nft_element("add", 4, "qubes", "downstream", nft_key("10.137.0.9"))  # refused: no commit
c = n.nft_genid()
subprocess.run(["nft", "add", "table", "inet", "foreign"], check=True)
print(json.dumps([b - a, c - b, n.nft_genid() - c]))
""")
    assert got == [1, 0, 1]


def test_ipset_members_are_added_tested_and_removed_as_ipset_lists_them(netns: Netns) -> None:
    require_tool("ipset")
    netns.sh("ipset create qa hash:net,iface; ipset create qd hash:net family inet6")
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
n = Nfnl()
a, b = ("10.137.0.5/32", "vif5.0"), ("10.137.0.6/32", "vif5.0")
print(json.dumps([n.ipset_exists("qa"), n.ipset_exists("nosuch"),
    n.ipset_element("add", "qa", 4, *a), n.ipset_element("add", "qa", 4, *a),
    n.ipset_element("test", "qa", 4, *a), n.ipset_element("test", "qa", 4, *b),
    n.ipset_element("add", "qd", 6, "fd09:24ef:4179::/64")]))
""")
    assert got == [True, False, True, False, True, False, True]
    assert "10.137.0.5,vif5.0" in netns.sh("ipset list qa").stdout
    assert "fd09:24ef:4179::/64" in netns.sh("ipset list qd").stdout
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
n = Nfnl()
print(json.dumps([n.ipset_element("del", "qa", 4, "10.137.0.5/32", "vif5.0"),
                  n.ipset_element("del", "qa", 4, "10.137.0.5/32", "vif5.0")]))
""")
    assert got == [True, False]


def test_a_conntrack_purge_deletes_the_entries_of_its_addresses_and_no_other(netns: Netns) -> None:
    require_tool("conntrack")
    netns.sh("""
ip link set lo up
nft add table ip t
nft add chain ip t o '{ type filter hook output priority 0; }'
nft add rule ip t o ct state new accept
""")
    got = _in(netns, """
import socket
from vif_hotplug.kernel.nfnl import Nfnl
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for last in (2, 3, 4):
    s.sendto(b"x", (f"127.0.0.{last}", 9999))
print(json.dumps(Nfnl().conntrack_purge(["127.0.0.3", "127.0.0.4", "10.9.9.9"])))
""")
    assert got == 2
    left = netns.sh("conntrack -L 2>/dev/null").stdout
    assert "dst=127.0.0.2" in left and "dst=127.0.0.3" not in left and "dst=127.0.0.4" not in left


def test_the_xtables_digest_moves_with_rules_and_policies_but_not_with_counters(netns: Netns) -> None:
    require_tool("iptables-legacy")
    code = """
from vif_hotplug.kernel.xtables_state import tables_digest
print(json.dumps(tables_digest([(4, "filter"), (6, "filter"), (4, "raw")])))
"""
    empty = _in(netns, code)
    netns.sh("iptables-legacy -A FORWARD -s 10.1.2.3 -j DROP; ip link set lo up; iptables-legacy -A OUTPUT -j ACCEPT")
    ruled = _in(netns, code)
    netns.run(sys.executable, "-c", "import socket; socket.socket(2, 2).sendto(b'x', ('127.0.0.1', 9))")
    counted = _in(netns, code)
    netns.sh("iptables-legacy -R FORWARD 1 -s 10.1.2.4 -j DROP")
    replaced = _in(netns, code)
    netns.sh("ip6tables-legacy -P FORWARD DROP")
    policy = _in(netns, code)
    assert len({empty, ruled, replaced, policy}) == 4
    assert counted == ruled


NETS_SETS = """
nft add table ip qubes
nft add set ip qubes allowed '{ type ifname . ipv4_addr; }'
nft add set ip qubes allowed-nets '{ type ifname . ipv4_addr; flags interval; }'
nft add set ip qubes downstream '{ type ipv4_addr; }'
nft add set ip qubes downstream-nets '{ type ipv4_addr; flags interval; }'
nft add element ip qubes allowed '{ "vif4.0" . 10.137.0.5, "vif12.3" . 10.137.0.6 }'
nft add element ip qubes allowed-nets '{ "vif7.0" . 10.137.8.0/24 }'
nft add element ip qubes downstream '{ 10.137.0.5, 10.137.0.6 }'
nft add element ip qubes downstream-nets '{ 10.137.8.0/24, 10.137.16.0/20 }'
nft add table ip6 qubes
nft add set ip6 qubes allowed '{ type ifname . ipv6_addr; }'
nft add element ip6 qubes allowed '{ "vif4.0" . fd09:24ef:4179::a89:5 }'
"""


def test_an_nftables_set_dump_lists_what_nft_lists_hosts_networks_and_interface_names(netns: Netns) -> None:
    require_tool("nft")
    netns.sh(NETS_SETS)
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
from vif_hotplug.kernel.set_dump import nft_members
n = Nfnl()
print(json.dumps({name: sorted(map(list, nft_members(n, fam, "qubes", name, name.startswith("allowed"))))
                  for fam, name in ((4, "allowed"), (4, "allowed-nets"), (4, "downstream"), (4, "downstream-nets"),
                                    (4, "nosuchset"))} | {"6": sorted(map(list, nft_members(n, 6, "qubes",
                                                                                         "allowed", True)))}))
""")
    assert got == {
        "allowed": [["10.137.0.5/32", "vif4.0"], ["10.137.0.6/32", "vif12.3"]],
        "allowed-nets": [["10.137.8.0/24", "vif7.0"]],
        "downstream": [["10.137.0.5/32", None], ["10.137.0.6/32", None]],
        "downstream-nets": [["10.137.16.0/20", None], ["10.137.8.0/24", None]],
        "nosuchset": [],
        "6": [["fd09:24ef:4179::a89:5/128", "vif4.0"]],
    }


def test_an_ipset_dump_lists_what_ipset_lists(netns: Netns) -> None:
    require_tool("ipset")
    netns.sh("ipset create qbs-allowed4 hash:net,iface; ipset add qbs-allowed4 10.137.0.5,vif4.0; "
             "ipset add qbs-allowed4 10.137.8.0/24,vif7.0; ipset create qbs-downstream6 hash:net family inet6; "
             "ipset add qbs-downstream6 fd09:24ef:4179::a89:5")
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
from vif_hotplug.kernel.set_dump import ipset_members
n = Nfnl()
print(json.dumps([sorted(map(list, ipset_members(n, s))) for s in ("qbs-allowed4", "qbs-downstream6", "nosuch")]))
""")
    assert got == [[["10.137.0.5/32", "vif4.0"], ["10.137.8.0/24", "vif7.0"]],
                   [["fd09:24ef:4179::a89:5/128", None]], []]


def test_a_dump_of_a_thousand_elements_comes_back_whole(netns: Netns) -> None:
    require_tool("nft")
    netns.sh(QUBES_SETS)
    elements = ", ".join(f'"vif{i}.0" . 10.137.{i // 250}.{i % 250 + 1}' for i in range(1000))
    netns.run("nft", f"add element ip qubes allowed {{ {elements} }}")
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
from vif_hotplug.kernel.set_dump import nft_members
print(json.dumps(len(set(nft_members(Nfnl(), 4, "qubes", "allowed", True)))))
""")
    assert got == 1000


def test_a_dump_for_one_device_among_a_thousand_lists_its_elements_and_no_name_that_contains_it(
    netns: Netns,
) -> None:
    require_tool("nft")
    require_tool("ipset")
    netns.sh(QUBES_SETS)
    elements = ", ".join(f'"vif{i}.0" . 10.137.{i // 250}.{i % 250 + 1}' for i in range(1000))
    # "vif4.0" is the tail of "vif14.0" and "xvif4.0" and the head of "vif4.01": none of them is it.
    elements += ', "xvif4.0" . 10.137.9.1, "vif4.01" . 10.137.9.2, "vif4.0" . 10.137.9.3'
    netns.run("nft", f"add element ip qubes allowed {{ {elements} }}")
    netns.sh("ipset create qbs-allowed4 hash:net,iface; ipset add qbs-allowed4 10.137.0.5,vif4.0; "
             "ipset add qbs-allowed4 10.137.0.6,xvif4.0; ipset add qbs-allowed4 10.137.0.15,vif14.0")
    got = _in(netns, """
from vif_hotplug.kernel.nfnl import Nfnl
from vif_hotplug.kernel.set_dump import ipset_members, nft_members
n = Nfnl()
print(json.dumps([sorted(map(list, nft_members(n, 4, "qubes", "allowed", True, dev="vif4.0"))),
                  sorted(map(list, nft_members(n, 4, "qubes", "allowed", True, dev="vif1000.0"))),
                  sorted(map(list, ipset_members(n, "qbs-allowed4", dev="vif4.0")))]))
""")
    assert got == [[["10.137.0.5/32", "vif4.0"], ["10.137.9.3/32", "vif4.0"]], [],
                   [["10.137.0.5/32", "vif4.0"]]]
