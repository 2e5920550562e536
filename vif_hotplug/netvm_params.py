"""Where this driver domain learns the addresses it presents to its VMs.

First source that has a ``gateway`` or ``primary_dns`` wins:

1. ``/etc/vif-hotplug/netvm.conf`` (path from ``VIF_HOTPLUG_CONF``), INI
   section ``[netvm]``: ``gateway``, ``gateway6``, ``primary_dns``,
   ``secondary_dns``, ``ipv6`` (``0``/``1``, overrides the gateway6 rule);
2. QubesDB via ``qubesdb-read`` when it is installed: ``/qubes-netvm-gateway``,
   ``/qubes-netvm-gateway6``, ``/qubes-netvm-primary-dns``,
   ``/qubes-netvm-secondary-dns``;
3. XenStore, the same names without the leading slash, relative to this
   domain's home (``qubes-netvm-gateway`` ...).

The same file's ``[hotplug]`` section holds local settings (``hooks_dir``),
and ``[mapped-ip]`` maps a VM's real address to what it sees
(``10.137.0.50 = 10.138.0.2 10.138.0.1``: visible address, optional visible
gateway), as QubesDB's ``/mapped-ip/<ip>/visible-ip`` and ``visible-gateway``
do (XenStore cannot hold them: its paths allow no dots).
"""

from __future__ import annotations

import configparser
import logging
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Literal

from .errors import InvalidInput
from .model import NetvmParams
from .validation import parse_ipv4, parse_ipv6

if TYPE_CHECKING:
    from .xenstore_client import XenStore

log = logging.getLogger(__name__)

DEFAULT_CONF = "/etc/vif-hotplug/netvm.conf"
DEFAULT_HOOKS_DIR = "/rw/config/network-hooks.d"
KEYS = ("gateway", "gateway6", "primary_dns", "secondary_dns")
_QUBES_NAMES = {
    "gateway": "qubes-netvm-gateway",
    "gateway6": "qubes-netvm-gateway6",
    "primary_dns": "qubes-netvm-primary-dns",
    "secondary_dns": "qubes-netvm-secondary-dns",
}


@dataclass(frozen=True)
class LocalSettings:
    hooks_dir: str = DEFAULT_HOOKS_DIR


def conf_path(env: Mapping[str, str]) -> str:
    return env.get("VIF_HOTPLUG_CONF") or DEFAULT_CONF


def _parse_ini(text: str, origin: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=origin)
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise InvalidInput(f"invalid config {origin}: {first}") from None
    return parser


def params_from_values(values: Mapping[str, str | None], source: str) -> NetvmParams:
    """Validate raw key values (as in ``KEYS``, plus optional ``ipv6``)."""

    def get(key: str) -> str | None:
        v = values.get(key)
        return v.strip() if v is not None and v.strip() else None

    gw, gw6, dns1, dns2 = (get(k) for k in KEYS)
    ipv6_raw = get("ipv6")
    override: bool | None = None
    if ipv6_raw is not None:
        if ipv6_raw not in ("0", "1"):
            raise InvalidInput(f"invalid ipv6 {ipv6_raw!r} in {source}: expected 0 or 1")
        override = ipv6_raw == "1"
    return NetvmParams(
        gateway=parse_ipv4(gw, f"gateway in {source}") if gw else None,
        gateway6=parse_ipv6(gw6, f"gateway6 in {source}") if gw6 else None,
        primary_dns=parse_ipv4(dns1, f"primary_dns in {source}") if dns1 else None,
        secondary_dns=parse_ipv4(dns2, f"secondary_dns in {source}") if dns2 else None,
        ipv6_override=override,
        source=source,
    )


def parse_netvm_conf(text: str, origin: str = "netvm.conf") -> NetvmParams | None:
    """``[netvm]`` of the config text, or ``None`` when the section is absent."""
    parser = _parse_ini(text, origin)
    if not parser.has_section("netvm"):
        return None
    section = parser["netvm"]
    unknown = set(section) - set(KEYS) - {"ipv6"}
    if unknown:
        raise InvalidInput(f"invalid config {origin}: unknown key {sorted(unknown)[0]!r} in [netvm]")
    return params_from_values(dict(section), origin)


def parse_local_settings(text: str, origin: str = "netvm.conf") -> LocalSettings:
    parser = _parse_ini(text, origin)
    if not parser.has_section("hotplug"):
        return LocalSettings()
    return LocalSettings(hooks_dir=parser["hotplug"].get("hooks_dir", DEFAULT_HOOKS_DIR))


def read_conf(env: Mapping[str, str]) -> tuple[str, str] | None:
    """(path, text) of the config file, or ``None`` when there is none."""
    path = conf_path(env)
    try:
        with open(path, encoding="utf-8") as f:
            return path, f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read config {path}: {exc}") from None


def load_local_settings(
    env: Mapping[str, str], conf: tuple[str, str] | Literal["read"] | None = "read"
) -> LocalSettings:
    """``[hotplug]`` settings; ``conf`` as returned by :func:`read_conf` if already read."""
    if conf == "read":
        conf = read_conf(env)
    settings = parse_local_settings(conf[1], conf[0]) if conf else LocalSettings()
    if env.get("VIF_HOTPLUG_HOOKS_DIR"):
        settings = LocalSettings(hooks_dir=env["VIF_HOTPLUG_HOOKS_DIR"])
    return settings


def _qubesdb_reader() -> Callable[[str], str | None] | None:
    exe = shutil.which("qubesdb-read")
    if exe is None:
        return None

    def read(key: str) -> str | None:
        try:
            proc = subprocess.run([exe, "--", key], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.rstrip("\n") if proc.returncode == 0 else None

    return read


def _has_params(p: NetvmParams) -> bool:
    return p.gateway is not None or p.primary_dns is not None


def load_netvm_params(
    env: Mapping[str, str],
    xenstore: XenStore | None = None,
    connect: Callable[[], XenStore] | None = None,
    conf: tuple[str, str] | Literal["read"] | None = "read",
) -> NetvmParams:
    """Netvm parameters from the first source that has them.

    ``xenstore`` is an open connection to reuse; otherwise ``connect`` opens
    one (only if the earlier sources had nothing); ``conf`` is the config
    file as returned by :func:`read_conf` when the caller already read it. Raises ``InvalidInput``
    for a bad value in the winning source, ``XenStoreUnavailable`` when
    XenStore is needed and down. Returns empty params if no source has any.
    """
    if conf == "read":
        conf = read_conf(env)
    if conf is not None:
        params = parse_netvm_conf(conf[1], conf[0])
        if params is not None and _has_params(params):
            return params

    reader = _qubesdb_reader()
    if reader is not None:
        params = params_from_values({k: reader("/" + q) for k, q in _QUBES_NAMES.items()}, "QubesDB")
        if _has_params(params):
            return params

    if xenstore is not None:
        return _from_xenstore(xenstore)
    if connect is not None:
        with connect() as xs:
            return _from_xenstore(xs)
    return NetvmParams()


def _from_xenstore(xs: XenStore) -> NetvmParams:
    return params_from_values({k: xs.read(q) for k, q in _QUBES_NAMES.items()}, "XenStore")


def parse_mapped(text: str, real_ip: str, origin: str = "netvm.conf") -> tuple[IPv4Address, IPv4Address | None] | None:
    """The ``[mapped-ip]`` entry for ``real_ip`` in the config text, if any."""
    parser = _parse_ini(text, origin)
    if not parser.has_section("mapped-ip") or real_ip not in parser["mapped-ip"]:
        return None
    words = parser["mapped-ip"][real_ip].split()
    if not 1 <= len(words) <= 2:
        raise InvalidInput(f"invalid mapped-ip {real_ip} in {origin}: expected 'visible-ip [visible-gateway]'")
    visible = parse_ipv4(words[0], f"visible-ip of {real_ip} in {origin}")
    gateway = parse_ipv4(words[1], f"visible-gateway of {real_ip} in {origin}") if len(words) == 2 else None
    return visible, gateway


def load_mapped(
    env: Mapping[str, str], real_ip: str, conf: tuple[str, str] | Literal["read"] | None = "read"
) -> tuple[IPv4Address, IPv4Address | None] | None:
    """(visible address, visible gateway) for a VM whose real address is ``real_ip``.

    ``None`` when unmapped or mapped onto itself. Config file first, then QubesDB.
    """
    if conf == "read":
        conf = read_conf(env)
    found = parse_mapped(conf[1], real_ip, conf[0]) if conf is not None else None
    if found is None:
        reader = _qubesdb_reader()
        if reader is not None:
            visible = reader(f"/mapped-ip/{real_ip}/visible-ip")
            if visible:
                gw = reader(f"/mapped-ip/{real_ip}/visible-gateway")
                found = (
                    parse_ipv4(visible, f"QubesDB visible-ip of {real_ip}"),
                    parse_ipv4(gw, f"QubesDB visible-gateway of {real_ip}") if gw else None,
                )
    if found is None or str(found[0]) == real_ip:
        return None
    return found
