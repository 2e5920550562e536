"""Where this driver domain learns what it presents to its VMs. Pure: sources are passed in.

``/etc/vif-hotplug/netvm.conf`` (INI), all sections optional::

    [netvm]        gateway, gateway6, primary_dns, secondary_dns, ipv6 (0|1),
                   connected_ips, connected_ips6 (space separated)
    [hotplug]      hooks_dir, harden (true|false)
    [firewall]     backend (auto|nftables|iptables)
    [mapped-ip]    <real address> = <visible address> [<visible gateway>]

Each value has its own order of sources, first that has it wins:

* netvm parameters: netvm.conf ``[netvm]`` (when it has ``gateway`` or
  ``primary_dns``), QubesDB ``/qubes-netvm-gateway`` ..., XenStore
  ``qubes-netvm-gateway`` ... relative to this domain's home;
* connected addresses: netvm.conf ``connected_ips``/``connected_ips6``,
  QubesDB ``/connected-ips``/``/connected-ips6``, XenStore
  ``qubes-connected-ips``/``qubes-connected-ips6``;
* mapped addresses: netvm.conf ``[mapped-ip]``, QubesDB
  ``/mapped-ip/<ip>/visible-ip`` and ``visible-gateway`` (XenStore paths
  cannot hold the dots of an address);
* hardening: netvm.conf ``harden``, QubesDB
  ``/qubes-service/harden-network-interfaces`` = ``1`` (:func:`service_enabled`).
"""

from __future__ import annotations

import configparser
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from .errors import InvalidInput
from .model import NetvmParams
from .plan_vif import Mapped
from .validation import parse_ipv4, parse_ipv6

DEFAULT_HOOKS_DIR = "/rw/config/network-hooks.d"
KEYS = ("gateway", "gateway6", "primary_dns", "secondary_dns")
#: QubesDB keys are these with a leading slash; XenStore keys relative to the home.
QUBES_NAMES = {
    "gateway": "qubes-netvm-gateway",
    "gateway6": "qubes-netvm-gateway6",
    "primary_dns": "qubes-netvm-primary-dns",
    "secondary_dns": "qubes-netvm-secondary-dns",
}
CONNECTED_QUBESDB = {4: "/connected-ips", 6: "/connected-ips6"}
CONNECTED_XENSTORE = {4: "qubes-connected-ips", 6: "qubes-connected-ips6"}
SERVICE_PREFIX = "/qubes-service/"
HARDEN_SERVICE = SERVICE_PREFIX + "harden-network-interfaces"
_NETVM_KEYS = {*KEYS, "ipv6", "connected_ips", "connected_ips6"}

#: Reads one key of a source; ``None`` when the key is absent.
Reader = Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Connected:
    """Addresses of every VM that uses this netvm, running or not."""

    ipv4: tuple[IPv4Address, ...] = ()
    ipv6: tuple[IPv6Address, ...] = ()
    source: str = "none"


@dataclass(frozen=True, slots=True)
class NetvmConf:
    """What netvm.conf says; ``None`` where it says nothing."""

    origin: str
    params: NetvmParams | None = None
    connected4: tuple[IPv4Address, ...] | None = None
    connected6: tuple[IPv6Address, ...] | None = None
    hooks_dir: str | None = None
    harden: bool | None = None
    backend: str | None = None
    mapped: tuple[tuple[str, Mapped], ...] = ()


def _parse_ini(text: str, origin: str) -> configparser.ConfigParser:
    # "gateway = 10.137.0.1   # the netvm's own address": a comment after a value, as the
    # commented conffile and the README show them (no value here ever holds a "#").
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
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
    for key, value in zip(KEYS, (gw, gw6, dns1, dns2), strict=True):
        if value is not None:
            _usable(value, f"{key} in {source}")
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


def _usable(text: str, what: str) -> None:
    """Refuse what no gateway, resolver or VM can be: a loopback, multicast or unspecified address.

    ``connected_ips = 127.0.0.1`` would otherwise drop the netvm's own loopback
    traffic, a multicast gateway would be answered for on every vif.
    """
    try:
        addr = ip_address(text)
    except ValueError:
        return  # the parser that follows names it
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified:
        raise InvalidInput(f"invalid {what} {text[:64]!r}: a loopback, multicast or unspecified address")


def parse_connected4(text: str, source: str) -> tuple[IPv4Address, ...]:
    what = f"connected address in {source}"
    for w in text.split():
        _usable(w, what)
    return tuple(dict.fromkeys(parse_ipv4(w, what) for w in text.split()))


def parse_connected6(text: str, source: str) -> tuple[IPv6Address, ...]:
    what = f"connected address in {source}"
    for w in text.split():
        _usable(w, what)
    return tuple(dict.fromkeys(parse_ipv6(w, what) for w in text.split()))


def _bool(value: str, what: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"invalid {what} {value[:32]!r}: expected true or false")


def _mapped_entry(real: str, value: str, origin: str) -> Mapped:
    words = value.split()
    if not 1 <= len(words) <= 2:
        raise InvalidInput(f"invalid mapped-ip {real} in {origin}: expected 'visible-ip [visible-gateway]'")
    return Mapped(
        parse_ipv4(real, f"mapped-ip real address in {origin}"),
        parse_ipv4(words[0], f"visible-ip of {real} in {origin}"),
        parse_ipv4(words[1], f"visible-gateway of {real} in {origin}") if len(words) == 2 else None,
    )


def parse_conf(text: str, origin: str = "netvm.conf") -> NetvmConf:
    """Every section of netvm.conf, validated. Raises ``InvalidInput`` naming the bad value."""
    parser = _parse_ini(text, origin)
    params = connected4 = connected6 = None
    if parser.has_section("netvm"):
        section = parser["netvm"]
        unknown = set(section) - _NETVM_KEYS
        if unknown:
            raise InvalidInput(f"invalid config {origin}: unknown key {sorted(unknown)[0]!r} in [netvm]")
        params = params_from_values(dict(section), origin)
        if "connected_ips" in section:
            connected4 = parse_connected4(section["connected_ips"], origin)
        if "connected_ips6" in section:
            connected6 = parse_connected6(section["connected_ips6"], origin)
    hooks_dir = harden = backend = None
    if parser.has_section("hotplug"):
        hotplug = parser["hotplug"]
        hooks_dir = hotplug.get("hooks_dir")
        if hooks_dir is not None and not hooks_dir.startswith("/"):
            raise InvalidInput(f"invalid hooks_dir {hooks_dir[:64]!r} in {origin}: not an absolute path")
        if "harden" in hotplug:
            harden = _bool(hotplug["harden"], f"harden in {origin}")
    if parser.has_section("firewall"):
        backend = parser["firewall"].get("backend")
        if backend is not None and backend not in ("auto", "nftables", "iptables"):
            raise InvalidInput(f"invalid backend {backend[:32]!r} in {origin}: expected auto, nftables or iptables")
    mapped: list[tuple[str, Mapped]] = []
    if parser.has_section("mapped-ip"):
        for real, value in parser["mapped-ip"].items():
            entry = _mapped_entry(real, value, origin)
            mapped.append((str(entry.real), entry))
    return NetvmConf(origin, params, connected4, connected6, hooks_dir, harden, backend, tuple(mapped))


def _has_params(p: NetvmParams) -> bool:
    return p.gateway is not None or p.primary_dns is not None


def resolve_params(conf: NetvmConf | None, qubesdb: Reader | None, xenstore: Reader | None) -> NetvmParams:
    """Netvm parameters from the first source that has them (empty when none has).

    ``xenstore`` is only called when the earlier sources had nothing. Raises
    ``InvalidInput`` for a bad value in the winning source.
    """
    if conf is not None and conf.params is not None and _has_params(conf.params):
        return conf.params
    if qubesdb is not None:
        params = params_from_values({k: qubesdb("/" + q) for k, q in QUBES_NAMES.items()}, "QubesDB")
        if _has_params(params):
            return params
    if xenstore is not None:
        return params_from_values({k: xenstore(q) for k, q in QUBES_NAMES.items()}, "XenStore")
    return NetvmParams()


def resolve_connected(conf: NetvmConf | None, qubesdb: Reader | None, xenstore: Reader | None) -> Connected | None:
    """The connected addresses, per family from the first source that has the key; ``None`` if no source does."""
    found: dict[int, tuple[str, str]] = {}
    for family in (4, 6):
        if conf is not None and (conf.connected4 if family == 4 else conf.connected6) is not None:
            continue
        for name, reader, key in (("QubesDB", qubesdb, CONNECTED_QUBESDB[family]),
                                  ("XenStore", xenstore, CONNECTED_XENSTORE[family])):
            value = reader(key) if reader is not None else None
            if value is not None:
                found[family] = (value, name)
                break
    conf4 = conf.connected4 if conf is not None else None
    conf6 = conf.connected6 if conf is not None else None
    if conf4 is None and conf6 is None and not found:
        return None
    v4 = conf4 if conf4 is not None else parse_connected4(found[4][0], found[4][1]) if 4 in found else ()
    v6 = conf6 if conf6 is not None else parse_connected6(found[6][0], found[6][1]) if 6 in found else ()
    sources = sorted({conf.origin for c in (conf4, conf6) if c is not None and conf is not None}
                     | {s for _, s in found.values()})
    return Connected(v4, v6, "+".join(sources))


def mapped_keys(real_ip: IPv4Address) -> tuple[str, str]:
    """The QubesDB keys of the mapping of ``real_ip``: its visible address and visible gateway."""
    return f"/mapped-ip/{real_ip}/visible-ip", f"/mapped-ip/{real_ip}/visible-gateway"


def resolve_mapped(conf: NetvmConf | None, qubesdb: Reader | None, real_ip: IPv4Address) -> Mapped | None:
    """The mapping of a VM whose real address is ``real_ip``; ``None`` when unmapped or mapped onto itself."""
    found: Mapped | None = None
    if conf is not None:
        found = dict(conf.mapped).get(str(real_ip))
    if found is None and qubesdb is not None:
        visible_key, gateway_key = mapped_keys(real_ip)
        visible = qubesdb(visible_key)
        if visible:
            gateway = qubesdb(gateway_key)
            found = Mapped(
                real_ip,
                parse_ipv4(visible, f"QubesDB visible-ip of {real_ip}"),
                parse_ipv4(gateway, f"QubesDB visible-gateway of {real_ip}") if gateway else None,
            )
    if found is None or found.visible == real_ip:
        return None
    return found


def service_enabled(qubesdb: Reader | None, name: str) -> bool:
    """Whether the Qubes service ``name`` is on: QubesDB ``/qubes-service/<name>`` is ``1``.

    As Qubes' own init reads it (``vm-systemd/qubes-sysinit.sh`` turns a
    service on for ``1`` and off for ``0`` and ignores any other value):
    ``0``, an empty value, anything else, an absent key and no QubesDB all
    mean off. (Qubes' vif script takes any non-empty value for on, ``0``
    included; its init, which starts the services, is the one followed.)
    """
    if qubesdb is None:
        return False
    value = qubesdb(SERVICE_PREFIX + name)
    return value == "1"


def resolve_harden(conf: NetvmConf | None, qubesdb: Reader | None) -> bool:
    """netvm.conf ``harden`` when it says, else the Qubes service ``harden-network-interfaces``."""
    if conf is not None and conf.harden is not None:
        return conf.harden
    return service_enabled(qubesdb, HARDEN_SERVICE.removeprefix(SERVICE_PREFIX))
