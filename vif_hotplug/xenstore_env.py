"""How the toolstack calls us, and what it left in XenStore for us.

Two invocation forms (README, "How it is called"):

* toolstack / udev: ``online|offline|add|remove [key=value ...]`` with env
  ``XENBUS_PATH=backend/vif/<domid>/<devid>`` and usually ``vif=<ifname>``;
* by hand: ``online|offline vif<domid>.<devid>``, the XenStore path derived
  from the name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .core.errors import InvalidInput
from .core.model import VmNetwork
from .core.validation import VifId, parse_ifname, parse_mac, parse_vif_name, parse_vm_addresses, parse_xenbus_path
from .xen.xenstore_port import XenStorePort, read_all

#: The keys of a vif's backend directory hotplug reads.
BACKEND_KEYS = ("ip", "mac", "type", "vifname")


Command = Literal["online", "offline", "add", "remove"]
COMMANDS: tuple[Command, ...] = ("online", "offline", "add", "remove")
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")
_VALUE_RE = re.compile(r"[A-Za-z0-9_.:/-]{0,64}")


@dataclass(frozen=True, slots=True)
class HotplugEvent:
    command: Command
    vif: VifId
    #: Interface name netback (or udev) gave us; the vif may be renamed later.
    dev: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def xenbus_path(self) -> str:
        return self.vif.xenbus_path

    @property
    def type_if(self) -> str:
        return dict(self.options).get("type_if", "vif")

    @property
    def trigger(self) -> str:
        """``udev`` when udev ran us (the shipped rule says so), else the toolstack or a person."""
        return dict(self.options).get("trigger", "toolstack")


def parse_invocation(args: Sequence[str], env: Mapping[str, str]) -> HotplugEvent:
    """Validate argv (after the command) and env; raises ``InvalidInput``."""
    if not args:
        raise InvalidInput("missing command: expected online, offline, add or remove")
    command, rest = args[0], list(args[1:])
    if command not in COMMANDS:
        raise InvalidInput(f"invalid command {command[:32]!r}: expected online, offline, add or remove")
    options: list[tuple[str, str]] = []
    positional: list[str] = []
    for arg in rest:
        key, eq, value = arg.partition("=")
        if eq:
            if not _KEY_RE.fullmatch(key) or not _VALUE_RE.fullmatch(value):
                raise InvalidInput(f"invalid argument {arg[:64]!r}: expected key=value")
            options.append((key, value))
        else:
            positional.append(arg)
    if len(positional) > 1:
        raise InvalidInput(f"unexpected argument {positional[1][:64]!r}")
    cmd: Command = command
    if positional:
        vif = parse_vif_name(positional[0])
        return HotplugEvent(cmd, vif, vif.name, tuple(options))

    xenbus_path = env.get("XENBUS_PATH")
    if not xenbus_path:
        raise InvalidInput("XENBUS_PATH is not set (toolstack form) and no vif name given (manual form)")
    vif = parse_xenbus_path(xenbus_path)
    dev = env.get("vif") or vif.name
    if dev != vif.name:
        if dev.startswith("vif") and re.fullmatch(r"vif[0-9]+\.[0-9]+", dev):
            got = parse_vif_name(dev)
            if got != vif:
                raise InvalidInput(f"invalid vif {dev!r}: does not match XENBUS_PATH {xenbus_path}")
        else:
            parse_ifname(dev, "vif")
    return HotplugEvent(cmd, vif, dev, tuple(options))


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """The vif's backend keys, validated. ``vm`` is None when offline found no usable ``ip``."""

    vm: VmNetwork | None
    vifname: str | None


def read_backend(xs: XenStorePort, xenbus_path: str, require: bool) -> BackendConfig:
    """Read ``ip``, ``mac``, ``type`` and ``vifname`` under ``xenbus_path``.

    With ``require`` (online) ``mac`` must be present and valid; an empty or
    missing ``ip`` is a VM without addresses, as in Qubes (its vif comes up
    and passes nothing). Without ``require`` (offline) a missing ``ip`` gives
    ``vm=None``, but a present value must still be valid. Raises
    ``InvalidInput`` naming the value.
    """
    ip, mac, vif_type_or_none, vifname_or_empty = read_all(xs, [f"{xenbus_path}/{key}" for key in BACKEND_KEYS])
    vif_type = vif_type_or_none or "vif"
    vifname = vifname_or_empty or None
    if vifname is not None:
        parse_ifname(vifname, "vifname")
        # Netback's name of another vif would make this one answer for it.
        netback_form = re.fullmatch(r"vif([0-9]+)\.([0-9]+)", vifname)
        if netback_form and f"backend/vif/{netback_form[1]}/{netback_form[2]}" != xenbus_path:
            raise InvalidInput(f"invalid vifname {vifname!r}: the name netback gives another vif")
    # Passed to the hooks as an argument: never one that reads as an option.
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,15}", vif_type):
        raise InvalidInput(f"invalid type {vif_type[:32]!r} in {xenbus_path}")
    if not require and (ip is None or not ip.strip()):
        return BackendConfig(None, vifname)
    networks = parse_vm_addresses(ip or "")
    if not mac:
        if require:
            raise InvalidInput(f"invalid mac '': {xenbus_path}/mac is empty or missing")
        return BackendConfig(VmNetwork(networks, "", vif_type), vifname)
    return BackendConfig(VmNetwork(networks, parse_mac(mac), vif_type), vifname)


def report_connected(xs: XenStorePort, xenbus_path: str) -> None:
    xs.write(f"{xenbus_path}/hotplug-status", "connected")


def report_error(xs: XenStorePort, xenbus_path: str, message: str) -> None:
    # hotplug-error first: the toolstack wakes on hotplug-status and reads it.
    xs.write(f"{xenbus_path}/hotplug-error", message)
    xs.write(f"{xenbus_path}/hotplug-status", "error")


#: The name libxl's ``script`` key has for this package's script (a path or a bare name).
SCRIPT_NAME = "vif-route-qubes"


def names_this_script(script: str | None) -> bool:
    """Whether a vif's backend key ``script`` names this package's script.

    Under udev (``run_hotplug_scripts=0``) Xen's rules run every script for
    every vif; a vif configured with another script (``vif-bridge``) is that
    script's, not ours.
    """
    return script is not None and script.rstrip().rsplit("/", 1)[-1] == SCRIPT_NAME
