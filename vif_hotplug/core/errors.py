"""Domain exceptions: every adapter translates library errors into these."""

from __future__ import annotations


class HotplugError(Exception):
    """Base class; ``str(exc)`` is a one-line message meant for the user."""


class InvalidInput(HotplugError):
    """A value from argv, the environment, XenStore or a config file is bad."""


class XenStoreUnavailable(HotplugError):
    """The XenStore daemon cannot be reached or did not answer in time."""


class KernelError(HotplugError):
    """The kernel refused a change (netlink, ipset, sysctl, iptables)."""


class DeviceGone(KernelError):
    """The network device vanished; for removals this counts as done."""
