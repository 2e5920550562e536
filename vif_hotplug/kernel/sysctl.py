"""Sysctls as plan settings (``/proc/sys/net`` follows the namespace of the thread that opens it)."""

from __future__ import annotations

import os

from ..core.errors import DeviceGone, KernelError
from ..core.model import Sysctl
from .netns import thread_netns

PROC_SYS = "/proc/sys"


def read_sysctl(key: str, netns: str | None = None, proc_sys: str = PROC_SYS) -> str | None:
    """The value of ``key`` (``net/ipv4/ip_forward``), or ``None`` when it does not exist."""
    with thread_netns(netns):
        try:
            with open(os.path.join(proc_sys, key), encoding="ascii") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None


def kernel_has_ipv6(proc_sys: str = PROC_SYS) -> bool:
    """``ipv6.disable=1`` (or a kernel without IPv6) removes ``net/ipv6`` from /proc/sys."""
    return os.path.isdir(os.path.join(proc_sys, "net", "ipv6"))


class Sysctls:
    """:class:`~vif_hotplug.core.model.Sysctl` settings under ``proc_sys``."""

    def __init__(self, proc_sys: str = PROC_SYS) -> None:
        self._proc_sys = proc_sys

    def set(self, s: Sysctl) -> Sysctl | None:
        """Write unless already there; the previous value when it changed, else ``None``.

        A per-interface key whose interface is gone raises :class:`DeviceGone`.
        """
        path = os.path.join(self._proc_sys, s.key)
        try:
            with thread_netns(s.netns):
                with open(path, encoding="ascii") as f:
                    old = f.read().strip()
                if old == s.value:
                    return None
                with open(path, "w", encoding="ascii") as f:
                    f.write(s.value)
        except FileNotFoundError:
            if s.dev is not None:
                raise DeviceGone(f"cannot set {s}: device {s.dev} does not exist") from None
            raise KernelError(f"cannot set {s}: {path} does not exist") from None
        except OSError as exc:
            raise KernelError(f"cannot set {s}: {exc.strerror}") from exc
        return s.with_value(old)

    def current(self, s: Sysctl) -> Sysctl | None:
        value = read_sysctl(s.key, s.netns, self._proc_sys)
        return None if value is None else s.with_value(value)
