"""pyroute2's exceptions become this package's one netlink error at the boundary (:mod:`.pyroute2_errors`).

The exceptions are pyroute2's own classes, as the installed pyroute2 (0.7.2
or 0.9) defines them; the adapters above turn the result into
:class:`KernelError`.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from pyroute2.netlink.exceptions import IPSetError, NetlinkDecodeError, NetlinkDumpInterrupted
from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

from vif_hotplug.core.errors import KernelError
from vif_hotplug.kernel import ipset
from vif_hotplug.kernel.nlsock import DumpInterrupted, NetlinkError
from vif_hotplug.kernel.pyroute2_errors import pyroute2_errors


def _raised(exc: BaseException) -> BaseException:
    with pytest.raises(BaseException) as err, pyroute2_errors():
        raise exc
    return err.value


def test_a_pyroute2_netlink_error_becomes_ours_with_its_errno() -> None:
    got = _raised(PyNetlinkError(errno.EEXIST))
    assert isinstance(got, NetlinkError)
    assert (got.errno, got.strerror) == (errno.EEXIST, "File exists")


def test_the_kernels_message_pyroute2_carried_is_kept_after_the_errno_text() -> None:
    got = _raised(PyNetlinkError(errno.EINVAL, "Invalid prefix for given prefix length"))
    assert isinstance(got, NetlinkError)
    assert got.strerror == "Invalid argument: Invalid prefix for given prefix length"


def test_an_ipset_error_keeps_ipsets_code_and_names_it() -> None:
    got = _raised(IPSetError(4103, "Element cannot be added to the set: it's already added"))
    assert isinstance(got, NetlinkError)
    assert got.errno == 4103
    assert got.strerror == ("ipset error 4103 (element already in the set, or not in it): "
                            "Element cannot be added to the set: it's already added")


def test_an_interrupted_pyroute2_dump_becomes_dump_interrupted() -> None:
    got = _raised(NetlinkDumpInterrupted())
    assert isinstance(got, DumpInterrupted) and got.errno == errno.EINTR


def test_an_answer_pyroute2_could_not_decode_is_a_protocol_error() -> None:
    got = _raised(NetlinkDecodeError(ValueError("short attribute")))
    assert isinstance(got, NetlinkError)
    assert got.errno == errno.EPROTO and "short attribute" in (got.strerror or "")


def test_other_os_errors_pass_unchanged() -> None:
    original = FileNotFoundError(errno.ENOENT, "No such file or directory")
    assert _raised(original) is original


class _RefusingIPSet:
    """Stands in for pyroute2.IPSet (no root here): each call raises pyroute2's own ipset error for ``code``."""

    code = errno.EEXIST

    def __init__(self) -> None:
        pass

    def _fail(self, *args: Any, **kw: Any) -> Any:
        raise IPSetError(self.code, "Set cannot be created: set with the same name already exists")

    create = destroy = list = _fail

    def close(self) -> None:
        pass


@pytest.fixture
def refusing(monkeypatch: pytest.MonkeyPatch) -> type[_RefusingIPSet]:
    monkeypatch.setattr("pyroute2.IPSet", _RefusingIPSet)
    return _RefusingIPSet


def test_a_set_pyroute2_cannot_create_is_a_kernel_error_naming_it(refusing: type[_RefusingIPSet]) -> None:
    with pytest.raises(KernelError) as err:
        ipset.IpSets().ensure_set("qbs-allowed4", "hash:net,iface", 4)
    assert str(err.value) == ("cannot create set qbs-allowed4 (hash:net,iface): File exists: "
                              "Set cannot be created: set with the same name already exists")


def test_destroying_or_listing_a_missing_set_through_pyroute2_is_no_error(
        refusing: type[_RefusingIPSet], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refusing, "code", errno.ENOENT)
    sets = ipset.IpSets()
    assert sets.destroy("qbs-allowed4") is False
    assert sets.members("qbs-allowed4") == []
