"""The netlink boundary against the real kernel, in throw-away namespaces: lost answers, old kernels, errors.

Each check runs in a child process inside the namespace (a netlink socket
belongs to the namespace it is opened in), with this test run's Python, so
under either supported pyroute2 (0.7.2, 0.9) when that is what the venv has.
"""

from __future__ import annotations

import json
import sys

from .conftest import Netns, NetnsFactory, require_tool


def _in(ns: Netns, code: str) -> object:
    out = ns.run(sys.executable, "-c", "import json\n" + code).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_read_whose_answers_overflow_the_socket_fails_with_enobufs_instead_of_waiting(netns: Netns) -> None:
    got = _in(netns, """
import socket
from vif_hotplug.kernel import nlsock
from vif_hotplug.kernel.rtnl import Rtnl

sent = []
def tiny(protocol):
    # The smallest receive buffer: a link's reply fills it and the ACK is dropped (netlink_overrun).
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    send = s.send
    class Counting:
        def __getattr__(self, name): return getattr(s, name)
        def send(self, data): sent.append(len(data)); return send(data)
    return Counting()
try:
    Rtnl(opener=tiny).link("lo")
    print(json.dumps(["no error"]))
except nlsock.NetlinkError as exc:
    print(json.dumps([exc.errno, len(sent), nlsock.ATTEMPTS]))
""")
    assert got[0] == 105  # ENOBUFS
    assert got[1] == got[2]


def test_the_kernels_reason_is_in_the_error_of_a_refused_change(netns: Netns) -> None:
    netns.sh("ip link add a0 type veth peer name a1")
    got = _in(netns, """
from vif_hotplug.core.errors import KernelError
from vif_hotplug.core.model import Route
from vif_hotplug.kernel.netlink import Links
from vif_hotplug.kernel.rtnl import Rtnl
rtnl = Rtnl()
try:
    Links(lambda ns: rtnl).add_route(Route("a0", "10.137.0.5/32"))
except KernelError as exc:
    print(json.dumps(str(exc)))
""")
    # net/ipv4/fib_semantics.c: a nexthop device that is down.
    assert got == "cannot add route 10.137.0.5/32 dev a0: Network is down: Device for nexthop is not up"


def test_without_strict_checking_one_links_addresses_and_routes_are_still_its_own(netns: Netns) -> None:
    netns.sh("""
ip link add a0 type veth peer name a1
ip link set a0 addrgenmode none; ip link set a1 addrgenmode none
ip link set a0 up; ip link set a1 up
ip addr add 10.137.0.1/32 dev a0
ip addr add 10.200.0.1/24 dev a1
ip route add 10.137.0.5/32 dev a0 metric 32752
ip route add 10.201.0.0/24 dev a1
""")
    got = _in(netns, """
import errno, socket
from vif_hotplug.kernel import nlsock
from vif_hotplug.kernel.rtnl import Rtnl

def pre_4_20(protocol):
    # A kernel without NETLINK_GET_STRICT_CHK: the option is unknown, dumps come whole.
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    class Old:
        def __getattr__(self, name): return getattr(s, name)
        def setsockopt(self, level, option, value):
            if option == nlsock.NETLINK_GET_STRICT_CHK:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            s.setsockopt(level, option, value)
    return Old()
old, new = Rtnl(opener=pre_4_20), Rtnl()
old.open()
a0 = new.link("a0").index
print(json.dumps({"strict": [old.strict, new.strict],
                  "old": [sorted(old.addresses(a0)), old.routes(a0, socket.AF_INET)],
                  "new": [sorted(new.addresses(a0)), new.routes(a0, socket.AF_INET)]}))
""")
    assert got["strict"] == [False, True]
    assert got["old"] == got["new"] == [["10.137.0.1/32"], [["10.137.0.5/32", 32752]]]


def test_ipset_refusals_through_pyroute2_are_kernel_errors_naming_the_set(netns: Netns) -> None:
    require_tool("ipset")
    netns.sh("ipset create qa hash:ip")
    got = _in(netns, """
from vif_hotplug.core.errors import KernelError
from vif_hotplug.kernel.ipset import IpSets
sets = IpSets()
out = []
try:
    sets.ensure_set("qa", "hash:net,iface", 4)  # there, of another type
except KernelError as exc:
    out.append(str(exc))
out += [sets.destroy("nosuch"), sets.members("nosuch")]
sets.ensure_set("qb", "hash:net,iface", 4)
sets.add("qb", 4, ("10.137.0.5/32", "vif5.0"))
out.append(sets.members("qb"))
print(json.dumps(out))
""")
    assert got[0].startswith("cannot create set qa (hash:net,iface): File exists")
    assert got[1:] == [False, [], [["10.137.0.5/32", "vif5.0"]]]


def test_a_veth_into_a_missing_namespace_is_a_kernel_error_naming_it(netns: Netns) -> None:
    got = _in(netns, """
from vif_hotplug.core.errors import KernelError
from vif_hotplug.core.model import Veth
from vif_hotplug.kernel.netns import Namespaces, RtnlFactory
from vif_hotplug.kernel.rtnl import Rtnl
v = Veth("vt0", "fe:ff:ff:ff:ff:01", "vt1", "fe:ff:ff:ff:ff:02", "vh-nosuch-namespace")
try:
    Namespaces(Rtnl(), RtnlFactory()).add_veth(v)
except KernelError as exc:
    print(json.dumps(str(exc)))
""")
    assert got.startswith("cannot add veth")
    assert "vh-nosuch-namespace" in got


def test_a_veth_pair_and_a_namespace_are_made_and_removed_through_pyroute2(make_netns: NetnsFactory) -> None:
    ns = make_netns()
    got = _in(ns, """
from vif_hotplug.core.model import Netns, Veth
from vif_hotplug.kernel.netns import Namespaces, RtnlFactory, netns_exists
from vif_hotplug.kernel.rtnl import Rtnl
import uuid
name = "vh-nl-" + uuid.uuid4().hex[:8]
n = Namespaces(Rtnl(), RtnlFactory())
v = Veth("vt0", "fe:ff:ff:ff:ff:01", "vt1", "fe:ff:ff:ff:ff:02", name)
out = [n.add_netns(Netns(name)), n.add_netns(Netns(name)), n.add_veth(v), n.add_veth(v), n.veth_present(v),
       n.remove_veth(v), n.remove_veth(v), n.remove_netns(Netns(name)), netns_exists(name)]
print(json.dumps(out))
""")
    assert got == [True, False, True, False, True, True, False, True, False]
