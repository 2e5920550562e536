"""The netfilter netlink requests and answers of :mod:`vif_hotplug.kernel.nfnl`, checked against pyroute2.

Answers: the captured kernel replies (``tests/unit/data/netlink``) read the
same through this package and through pyroute2's message classes
(``nft_gen_msg``, ``nfct_msg``). Requests: decoded with pyroute2's classes
(``nft_set_elem_list_msg``, ``ipset_msg``, ``nfct_msg``, ``nfgen_msg``)
they equal pyroute2's encoding of the same request, field by field. Two
attribute flags differ, both ignored by the kernel's parser
(``lib/nlattr.c``: the type is masked with ``NLA_TYPE_MASK``): this package
marks nested attributes ``NLA_F_NESTED`` as libnftnl does (strict policies
since Linux 5.2 want it), pyroute2 leaves nftables' unmarked; pyroute2 marks
ipset's CIDR ``NLA_F_NET_BYTEORDER``, which ipset's hash types never check
(``ip_set_attr_netorder`` is asked of ports, timeouts and marks only).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pyroute2.netlink.nfnetlink import nfgen_msg
from pyroute2.netlink.nfnetlink.ipset import ipset_msg
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg
from pyroute2.netlink.nfnetlink.nftsocket import nft_gen_msg, nft_set_elem_list_msg

from vif_hotplug.kernel import nlsock
from vif_hotplug.kernel.nfnl import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPSET_CMD_ADD,
    IPSET_CMD_DEL,
    IPSET_CMD_HEADER,
    IPSET_CMD_TEST,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_CTNETLINK,
    NFNL_SUBSYS_IPSET,
    NFNL_SUBSYS_NFTABLES,
    NFT_MSG_DELSETELEM,
    NFT_MSG_GETGEN,
    NFT_MSG_GETSETELEM,
    NFT_MSG_NEWSETELEM,
    Nfnl,
    nft_key,
)

from .nlreplay import AckingSocket, ReplaySocket, load, opener

F_REQ_ACK = nlsock.NLM_F_REQUEST | nlsock.NLM_F_ACK
KEY = nft_key("10.137.0.5", "vif5.0")


def _replayed(name: str) -> Nfnl:
    return Nfnl(opener=opener(ReplaySocket(load(name))))


def _plain(value: Any) -> Any:
    """pyroute2's decoding as (name, value) trees: no attribute flags, no header bookkeeping."""
    if hasattr(value, "get_flags") and hasattr(value, "name"):  # pyroute2's nla_slot: name, value, flags
        return (value.name, _plain(value.value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("header", "length")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _decoded(cls: Any, data: bytes) -> tuple[int, int, Any]:
    m = cls(data)
    m.decode()
    return m["header"]["type"], m["header"]["flags"], _plain(m)


def _pyroute2(cls: Any, kind: int, flags: int, family: int, attrs: list[Any], res_id: int = 0) -> bytes:
    m = cls()
    m["header"]["type"] = kind
    m["header"]["flags"] = flags
    m["header"]["sequence_number"] = 1
    m["nfgen_family"] = family
    m["res_id"] = res_id
    m["attrs"] = attrs
    m.encode()
    return bytes(m.data[: m["header"]["length"]])


def _sent(call: Any) -> list[bytes]:
    """The messages of the one datagram ``call`` sends (a batch is several)."""
    sock = AckingSocket()
    call(Nfnl(opener=lambda _: sock))
    assert len(sock.sent) == 1
    data = sock.sent[0]
    out, offset = [], 0
    while offset < len(data):
        length = nlsock.NLMSGHDR.unpack_from(data, offset)[0]
        out.append(data[offset : offset + length])
        offset += (length + 3) & ~3
    return out


# --- answers ---------------------------------------------------------------------------


def test_the_nftables_generation_is_the_one_pyroute2_reads() -> None:
    fixture = load("nft_getgen")
    reply = next(raw for kind, _, _, raw in fixture.messages() if kind == (NFNL_SUBSYS_NFTABLES << 8) | 15)
    m = nft_gen_msg(reply)
    m.decode()
    assert _replayed("nft_getgen").nft_genid() == m.get_attr("NFTA_GEN_ID")


@pytest.fixture
def tracked(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The namespace's conntrack count says entries exist (the capture's had three)."""
    count = tmp_path / "nf_conntrack_count"
    count.write_text("3\n")
    monkeypatch.setattr("vif_hotplug.kernel.nfnl._CONNTRACK_COUNT", str(count))


@pytest.mark.usefixtures("tracked")
def test_a_conntrack_purge_deletes_the_entry_pyroute2_finds_with_the_address() -> None:
    fixture = load("conntrack_purge")
    matching = []
    for kind, _, _, raw in fixture.messages(0):
        if kind != (NFNL_SUBSYS_CTNETLINK << 8) | 0:  # IPCTNL_MSG_CT_NEW: one entry
            continue
        m = nfct_msg(raw)
        m.decode()
        ip = m.get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP")
        if "127.0.0.3" in (ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")):
            matching.append(m)
    assert len(matching) == 1
    sock = ReplaySocket(fixture)
    assert Nfnl(opener=opener(sock)).conntrack_purge(["127.0.0.3"]) == 1
    delete = nfct_msg(sock.sent[1])
    delete.decode()
    assert delete["header"]["type"] == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    assert _plain(delete.get_attr("CTA_TUPLE_ORIG")) == _plain(matching[0].get_attr("CTA_TUPLE_ORIG"))
    assert delete.get_attr("CTA_ID") == matching[0].get_attr("CTA_ID")


@pytest.mark.parametrize(("name", "expected"), [
    ("nft_getelem_present", True),
    ("nft_getelem_missing_set", False),
])
def test_an_nftables_element_lookup_reads_the_kernels_answer(name: str, expected: bool) -> None:
    assert _replayed(name).nft_element("get", 4, "qubes", "nosuchset" if "missing" in name else "allowed",
                                       KEY) is expected


def test_adding_an_nftables_element_that_is_there_is_no_change() -> None:
    assert _replayed("nft_newelem_exists").nft_element("add", 4, "qubes", "allowed", KEY) is False


def test_testing_an_ipset_non_member_is_false() -> None:
    assert _replayed("ipset_test_absent").ipset_element("test", "qa", 4, "10.137.0.9/32", "vif5.0") is False


def test_a_missing_ipset_does_not_exist() -> None:
    assert _replayed("ipset_header_missing").ipset_exists("nosuch") is False


# --- requests --------------------------------------------------------------------------


def _elements(key: bytes) -> list[Any]:
    element = {"attrs": [("NFTA_SET_ELEM_KEY", {"attrs": [("NFTA_DATA_VALUE", key)]})]}
    return [("NFTA_SET_ELEM_LIST_TABLE", "qubes"), ("NFTA_SET_ELEM_LIST_SET", "allowed"),
            ("NFTA_SET_ELEM_LIST_ELEMENTS", [element])]


def test_an_nftables_element_lookup_is_encoded_as_pyroute2_encodes_it() -> None:
    [ours] = _sent(lambda n: n.nft_element("get", 4, "qubes", "allowed", KEY))
    theirs = _pyroute2(nft_set_elem_list_msg, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, F_REQ_ACK,
                       socket.AF_INET, _elements(KEY))
    assert _decoded(nft_set_elem_list_msg, ours) == _decoded(nft_set_elem_list_msg, theirs)


@pytest.mark.parametrize(("op", "kind", "flags"), [
    ("add", NFT_MSG_NEWSETELEM, nlsock.NLM_F_CREATE | nlsock.NLM_F_EXCL),
    ("del", NFT_MSG_DELSETELEM, 0),
])
def test_an_nftables_element_change_is_a_batch_encoded_as_pyroute2_encodes_it(op: str, kind: int, flags: int) -> None:
    begin, change, end = _sent(lambda n: n.nft_element(op, 6, "qubes", "allowed", KEY))
    for ours, batch in ((begin, NFNL_MSG_BATCH_BEGIN), (end, NFNL_MSG_BATCH_END)):
        theirs = _pyroute2(nfgen_msg, batch, nlsock.NLM_F_REQUEST, 0, [], res_id=NFNL_SUBSYS_NFTABLES)
        assert _decoded(nfgen_msg, ours) == _decoded(nfgen_msg, theirs)
    theirs = _pyroute2(nft_set_elem_list_msg, (NFNL_SUBSYS_NFTABLES << 8) | kind, F_REQ_ACK | flags,
                       socket.AF_INET6, _elements(KEY))
    assert _decoded(nft_set_elem_list_msg, change) == _decoded(nft_set_elem_list_msg, theirs)


def test_the_generation_request_is_encoded_as_pyroute2_encodes_it() -> None:
    sock = ReplaySocket(load("nft_getgen"))
    Nfnl(opener=opener(sock)).nft_genid()
    theirs = _pyroute2(nft_gen_msg, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, F_REQ_ACK, 0, [])
    assert sock.sent == [theirs]


@pytest.mark.parametrize(("op", "cmd", "flags"), [
    ("add", IPSET_CMD_ADD, nlsock.NLM_F_EXCL),
    ("del", IPSET_CMD_DEL, nlsock.NLM_F_EXCL),
    ("test", IPSET_CMD_TEST, 0),
])
def test_an_ipset_member_request_is_encoded_as_pyroute2_encodes_it(op: str, cmd: int, flags: int) -> None:
    [ours] = _sent(lambda n: n.ipset_element(op, "qa", 4, "10.137.0.5/32", "vif5.0"))
    theirs = _pyroute2(ipset_msg, (NFNL_SUBSYS_IPSET << 8) | cmd, F_REQ_ACK | flags, socket.AF_INET, [
        ("IPSET_ATTR_PROTOCOL", 7), ("IPSET_ATTR_SETNAME", "qa"),
        ("IPSET_ATTR_DATA", {"attrs": [("IPSET_ATTR_IP", {"attrs": [("IPSET_ATTR_IPADDR_IPV4", "10.137.0.5")]}),
                                       ("IPSET_ATTR_CIDR", 32), ("IPSET_ATTR_IFACE", "vif5.0")]}),
    ])
    assert _decoded(ipset_msg, ours) == _decoded(ipset_msg, theirs)


def test_an_ipv6_network_member_is_encoded_as_pyroute2_encodes_it() -> None:
    [ours] = _sent(lambda n: n.ipset_element("add", "qd", 6, "fd09:24ef:4179::/64"))
    theirs = _pyroute2(ipset_msg, (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_ADD, F_REQ_ACK | nlsock.NLM_F_EXCL,
                       socket.AF_INET6, [
        ("IPSET_ATTR_PROTOCOL", 7), ("IPSET_ATTR_SETNAME", "qd"),
        ("IPSET_ATTR_DATA", {"attrs": [("IPSET_ATTR_IP", {"attrs": [("IPSET_ATTR_IPADDR_IPV6", "fd09:24ef:4179::")]}),
                                       ("IPSET_ATTR_CIDR", 64)]}),
    ])
    assert _decoded(ipset_msg, ours) == _decoded(ipset_msg, theirs)


def test_an_ipset_header_request_is_encoded_as_pyroute2_encodes_it() -> None:
    [ours] = _sent(lambda n: n.ipset_exists("qa"))
    theirs = _pyroute2(ipset_msg, (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_HEADER, F_REQ_ACK, 0,
                       [("IPSET_ATTR_PROTOCOL", 7), ("IPSET_ATTR_SETNAME", "qa")])
    assert ours == theirs


@pytest.mark.usefixtures("tracked")
def test_the_conntrack_dump_request_is_encoded_as_pyroute2_encodes_it() -> None:
    sock = ReplaySocket(load("conntrack_purge"))
    Nfnl(opener=opener(sock)).conntrack_purge(["127.0.0.3"])
    theirs = _pyroute2(nfct_msg, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, F_REQ_ACK | nlsock.NLM_F_DUMP,
                       0, [])
    assert sock.sent[0] == theirs
