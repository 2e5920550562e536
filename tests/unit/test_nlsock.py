"""The netlink transport (:mod:`vif_hotplug.kernel.nlsock`) on the kernel's own answers.

Every answer replayed here was captured from the real kernel
(``tests/capture_netlink.py``); where a test changes one (an error the
kernel returned in another capture, a stale answer queued early, a smaller
buffer), it says so. The replaying socket keeps the real socket's rules
(``tests/unit/nlreplay.py``).
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vif_hotplug.kernel import nlsock
from vif_hotplug.kernel.nfnl import NETLINK_NETFILTER
from vif_hotplug.kernel.nlsock import DumpInterrupted, NetlinkError, NetlinkSocket
from vif_hotplug.kernel.rtnl import RTM_GETLINK, RTM_NEWLINK, RTM_NEWROUTE, Rtnl

from .nlreplay import Exchange, Fixture, ReplaySocket, load, opener


def _rtnl(fixture: Fixture, **kw: object) -> tuple[Rtnl, ReplaySocket]:
    sock = ReplaySocket(fixture, **kw)  # type: ignore[arg-type]
    return Rtnl(opener=opener(sock)), sock


def _raw(fixture: Fixture, protocol: int = socket.NETLINK_ROUTE) -> tuple[NetlinkSocket, ReplaySocket]:
    sock = ReplaySocket(fixture)
    strict = protocol == socket.NETLINK_ROUTE
    return NetlinkSocket(protocol, strict=strict, opener=opener(sock)), sock


def _replay_request(nl: NetlinkSocket, fixture: Fixture, exchange: int = 0) -> list[tuple[int, bytes]]:
    """Send the captured request again, as it was (type, flags, payload)."""
    sent = fixture.exchanges[exchange].sent
    length, kind, flags, _, _ = nlsock.NLMSGHDR.unpack_from(sent)
    return nl.request(kind, flags & ~(nlsock.NLM_F_REQUEST | nlsock.NLM_F_ACK), sent[nlsock.NLMSGHDR.size : length])


def _count(fixture: Fixture, kind: int, exchange: int = 0) -> int:
    return sum(1 for t, _, _, _ in fixture.messages(exchange) if t == kind)


# --- dumps -------------------------------------------------------------------------


def test_a_dump_spanning_several_datagrams_is_returned_whole() -> None:
    fixture = load("link_dump_interrupted")
    whole = Fixture(fixture.name, fixture.about, fixture.socket_options, fixture.refused_options,
                    [fixture.exchanges[1]])
    assert len(whole.datagrams()) >= 3
    rtnl, _ = _rtnl(whole)
    assert len(rtnl.links()) == _count(whole, RTM_NEWLINK) == 40


def test_an_interrupted_dump_is_redone_and_the_second_answer_returned() -> None:
    fixture = load("link_dump_interrupted")
    assert any(f & nlsock.NLM_F_DUMP_INTR for _, f, _, _ in fixture.messages(0))
    rtnl, sock = _rtnl(fixture)
    links = rtnl.links()
    assert len(sock.sent) == 2
    assert {link.name for link in links} >= {"late0", "late1"}  # added while the first dump ran
    assert len(links) == _count(fixture, RTM_NEWLINK, 1)


def test_a_dump_interrupted_every_time_fails_after_the_last_attempt() -> None:
    fixture = load("link_dump_interrupted")
    interrupted = Fixture(fixture.name, fixture.about, fixture.socket_options, fixture.refused_options,
                          [fixture.exchanges[0]])
    rtnl, sock = _rtnl(interrupted, repeat=True)
    with pytest.raises(DumpInterrupted) as err:
        rtnl.links()
    assert err.value.errno == errno.EINTR
    assert "interrupted" in (err.value.strerror or "")
    assert len(sock.sent) == nlsock.ATTEMPTS


def test_a_dump_refused_in_its_done_raises_the_kernels_error() -> None:
    fixture = load("route_dump_bad_header")
    nl, _ = _raw(fixture)
    with pytest.raises(NetlinkError) as err:
        _replay_request(nl, fixture)
    assert err.value.errno == errno.EINVAL
    assert err.value.strerror == "Invalid argument: Invalid values in header for FIB dump request"


# --- errors and extended ACKs ------------------------------------------------------------


def test_the_kernels_message_is_appended_to_the_errno_text() -> None:
    fixture = load("route_add_bad_prefix")
    nl, _ = _raw(fixture)
    with pytest.raises(NetlinkError) as err:
        _replay_request(nl, fixture)
    assert err.value.errno == errno.EINVAL
    assert err.value.strerror == "Invalid argument: Invalid prefix for given prefix length"
    assert err.value.kernel_message == "Invalid prefix for given prefix length"


def test_the_attribute_the_kernel_blamed_is_named_in_the_error() -> None:
    rtnl, _ = _rtnl(load("link_set_long_name"))
    with pytest.raises(NetlinkError) as err:
        rtnl.set_link(3, name="x" * 30)
    assert err.value.errno == errno.ERANGE
    assert err.value.strerror == "Numerical result out of range: Attribute failed policy validation (attribute type 3)"


def test_an_error_echoing_the_whole_request_is_read_past_it() -> None:
    rtnl, _ = _rtnl(load("link_set_long_name_uncapped"))
    with pytest.raises(NetlinkError) as err:
        rtnl.set_link(3, name="x" * 30)
    assert err.value.kernel_message == "Attribute failed policy validation"


def test_an_error_without_extended_ack_has_the_errno_text_alone() -> None:
    fixture = load("link_get_missing")
    nl, _ = _raw(fixture)
    with pytest.raises(NetlinkError) as err:
        _replay_request(nl, fixture)
    assert err.value.errno == errno.ENODEV
    assert err.value.strerror == "No such device"
    assert err.value.kernel_message is None


def test_ipsets_own_error_codes_are_named() -> None:
    fixture = load("ipset_test_absent")
    nl, _ = _raw(fixture, NETLINK_NETFILTER)
    with pytest.raises(NetlinkError) as err:
        _replay_request(nl, fixture)
    assert err.value.errno == 4103
    assert err.value.strerror == "ipset error 4103 (element already in the set, or not in it)"


# --- lost answers (ENOBUFS) ----------------------------------------------------------


def test_a_read_whose_ack_the_kernel_dropped_is_sent_again_then_fails_with_enobufs() -> None:
    fixture = load("link_get_overrun")
    assert fixture.exchanges[0].received[0] == "ENOBUFS"
    rtnl, sock = _rtnl(fixture, repeat=True)
    with pytest.raises(NetlinkError) as err:
        rtnl.link("vif5.0")
    assert err.value.errno == errno.ENOBUFS
    assert len(sock.sent) == nlsock.ATTEMPTS


def test_a_read_whose_answers_all_survived_an_overrun_succeeds() -> None:
    # The capture of link_get, with an overrun reported first (it hit some earlier answer).
    fixture = load("link_get")
    fixture.exchanges[0].received.insert(0, "ENOBUFS")
    rtnl, sock = _rtnl(fixture)
    link = rtnl.link("vif5.0")
    assert link is not None and link.name == "vif5.0"
    assert len(sock.sent) == 1


def test_a_change_whose_ack_was_dropped_fails_with_enobufs_and_is_not_sent_again() -> None:
    # The capture of addr_add_ack, its ACK dropped by an overrun.
    fixture = load("addr_add_ack")
    fixture.exchanges[0].received[:] = ["ENOBUFS"]
    rtnl, sock = _rtnl(fixture)
    with pytest.raises(NetlinkError) as err:
        rtnl.address("add", 5, "198.51.100.1/32")
    assert err.value.errno == errno.ENOBUFS
    assert "outcome is unknown" in (err.value.strerror or "")
    assert len(sock.sent) == 1


# --- answers larger than the buffer --------------------------------------------------------


def test_a_dump_datagram_larger_than_the_buffer_grows_it_and_the_dump_is_redone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = load("link_dump")
    biggest = max(len(d) for d in fixture.datagrams())
    monkeypatch.setattr(nlsock, "RECV_BUFFER", biggest // 2)
    rtnl, sock = _rtnl(fixture, repeat=True)
    links = rtnl.links()
    assert len(sock.sent) == 2
    assert len(links) == _count(fixture, RTM_NEWLINK)


def test_a_read_answer_larger_than_the_buffer_is_read_again_not_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nlsock, "RECV_BUFFER", 256)
    rtnl, sock = _rtnl(load("link_get"), repeat=True)
    link = rtnl.link("vif5.0")
    assert link is not None and link.alias == "vif5.0-netback"
    assert len(sock.sent) == 2


class _DatagramPair:
    """A Unix datagram socket standing in for the kernel's end: real ``recv_into``/``MSG_TRUNC`` semantics."""

    def __init__(self, answers: list[bytes]) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.answers = answers
        self.sent: list[bytes] = []

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        pass

    def bind(self, address: tuple[int, int], /) -> None:
        pass

    def send(self, data: bytes, /) -> int:
        seq = nlsock.NLMSGHDR.unpack_from(data)[3]
        self.sent.append(data)
        for answer in self.answers:
            out = bytearray(answer)
            offset = 0
            while offset < len(out):
                length, mtype, flags, _, pid = nlsock.NLMSGHDR.unpack_from(out, offset)
                nlsock.NLMSGHDR.pack_into(out, offset, length, mtype, flags, seq, pid)
                offset += (length + 3) & ~3
            self.kernel.send(bytes(out))
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        return self.ours.recv_into(buffer, nbytes, flags)

    def close(self) -> None:
        self.ours.close()
        self.kernel.close()


def test_a_real_datagram_socket_reports_a_cut_answer_and_the_read_is_redone(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the replay: the receive path on a real datagram socket (MSG_TRUNC
    # returns the real length for Unix datagrams too, Linux 3.4 on).
    monkeypatch.setattr(nlsock, "RECV_BUFFER", 256)
    pair = _DatagramPair(load("link_get").datagrams())
    rtnl = Rtnl(opener=lambda _: pair)
    try:
        link = rtnl.link("vif5.0")
    finally:
        rtnl.close()
    assert link is not None and link.group == 2
    assert len(pair.sent) == 2


# --- socket options ------------------------------------------------------------------


def test_a_kernel_without_strict_checking_gives_a_socket_that_says_so() -> None:
    rtnl, sock = _rtnl(load("addr_dump_unfiltered"))
    rtnl.open()
    assert rtnl.strict is False
    assert "NETLINK_GET_STRICT_CHK" not in sock.options


def test_a_kernel_with_strict_checking_gives_a_strict_socket() -> None:
    rtnl, _ = _rtnl(load("addr_dump_strict"))
    rtnl.open()
    assert rtnl.strict is True


class _OldKernel:
    """A socket of a kernel that knows none of the options (before 4.3): each is ENOPROTOOPT."""

    def __init__(self) -> None:
        self.bound = False

    def setsockopt(self, level: int, option: int, value: int, /) -> None:
        raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    def bind(self, address: tuple[int, int], /) -> None:
        self.bound = True

    def send(self, data: bytes, /) -> int:
        raise AssertionError("not sent")

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0, /) -> int:
        raise AssertionError("not read")

    def close(self) -> None:
        pass


def test_a_kernel_without_ack_options_still_gives_a_usable_socket() -> None:
    old = _OldKernel()
    rtnl = Rtnl(opener=lambda _: old)
    rtnl.open()
    assert old.bound and rtnl.strict is False


def test_a_socket_option_failing_for_another_reason_is_an_error() -> None:
    class Refusing(_OldKernel):
        def setsockopt(self, level: int, option: int, value: int, /) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

    with pytest.raises(OSError) as err:
        Rtnl(opener=lambda _: Refusing()).open()
    assert err.value.errno == errno.EPERM


# --- which answers end a request -------------------------------------------------------------


def test_a_single_request_ends_at_its_ack_which_is_not_an_answer() -> None:
    fixture = load("link_get")
    nl, _ = _raw(fixture)
    answers = _replay_request(nl, fixture)
    assert [kind for kind, _ in answers] == [RTM_NEWLINK]


def test_a_dump_ends_at_done_which_is_not_an_answer() -> None:
    fixture = load("route_dump_strict")
    nl, _ = _raw(fixture)
    answers = _replay_request(nl, fixture)
    assert answers and {kind for kind, _ in answers} == {RTM_NEWROUTE}


def test_a_change_answered_by_its_ack_alone_returns_no_answers() -> None:
    fixture = load("addr_add_ack")
    nl, _ = _raw(fixture)
    assert _replay_request(nl, fixture) == []


def test_answers_to_an_abandoned_earlier_request_are_skipped() -> None:
    # Two captures: link_get_missing's ENODEV, still queued from request 1
    # (sequence number 1), ahead of link_get's answers to request 2.
    missing, found = load("link_get_missing"), load("link_get")
    both = Fixture("both", "", found.socket_options, [], [missing.exchanges[0], found.exchanges[0]])
    sock = ReplaySocket(both, early={1: missing.datagrams()})
    rtnl = Rtnl(opener=opener(sock))
    assert rtnl.link("nosuch0") is None
    link = rtnl.link("vif5.0")
    assert link is not None and link.name == "vif5.0"


def test_a_message_whose_length_does_not_fit_its_datagram_is_an_error_not_a_loop() -> None:
    fixture = load("link_get")
    reply = bytearray(fixture.datagrams()[0])
    struct.pack_into("=I", reply, 0, 0)  # nlmsg_len 0
    broken = Fixture("broken", "", fixture.socket_options, [], [Exchange(fixture.exchanges[0].sent, [bytes(reply)])])
    rtnl, _ = _rtnl(broken)
    with pytest.raises(NetlinkError) as err:
        rtnl.link("vif5.0")
    assert err.value.errno == errno.EPROTO


def test_requests_carry_increasing_sequence_numbers_and_the_request_flag() -> None:
    fixture = load("link_get")
    rtnl, sock = _rtnl(fixture, repeat=True)
    rtnl.link("vif5.0")
    rtnl.link("vif5.0")
    headers = [nlsock.NLMSGHDR.unpack_from(data) for data in sock.sent]
    assert [h[3] for h in headers] == [1, 2]
    assert all(h[1] == RTM_GETLINK and h[2] & (nlsock.NLM_F_REQUEST | nlsock.NLM_F_ACK) for h in headers)


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_any_datagram_is_read_or_refused_as_malformed(data: bytes) -> None:
    try:
        for _, _, _, payload in nlsock.messages(data):
            list(nlsock.attrs(payload))
            nlsock.error_detail(nlsock.NLMSG_ERROR, nlsock.NLM_F_ACK_TLVS, payload, data)
    except NetlinkError as exc:
        assert exc.errno == errno.EPROTO
