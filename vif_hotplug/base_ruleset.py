"""``vif-hotplug init``: what a network-providing domain needs before any vif.

Qubes 4.0 semantics (``../shared/README.md`` §5), applied once at boot and
idempotently on every rerun:

* IPv4 forwarding on; IPv6 forwarding on only when the netvm's IPv6 is on;
* nat: POSTROUTING leaves traffic towards VMs and ``lo`` alone and
  masquerades the rest (NAT at every hop); PREROUTING jumps to ``PR-QBS``
  (owned by ``qubes-setup-dnat-to-ns``) and ``PR-QBS-SERVICES`` (services);
* filter INPUT and FORWARD with policy DROP, the per-packet rules held in
  chains this command owns, the administrator's rules in reserved chains;
* the anti-spoofing sets and raw chain every vif relies on.

VM interfaces are matched by interface group (:data:`~vif_hotplug.model.VIF_GROUP`,
set by ``vif-route-qubes online``) rather than by a ``vif+`` name wildcard,
so a ``vifname`` rename keeps its VM in the right rules.

Chains (``*`` reserved: created when missing, contents never touched):

=========  ===========  =============================================
family     table        chains
=========  ===========  =============================================
4 and 6    filter       ``QBS-INPUT``, ``QBS-FORWARD-BASE``,
                        ``QBS-INPUT-ADMIN*``, ``QBS-FORWARD*``
4          filter       ``QBS-DNS*`` (the DNS tool's guard, jumped first)
4 and 6    nat          ``QBS-POSTROUTING``, ``PR-QBS-SERVICES*``
4          nat          ``PR-QBS*``
4 and 6    raw          ``QBS-ANTISPOOF`` (see :mod:`vif_hotplug.antispoof`)
=========  ===========  =============================================

Builtin chains only get a jump at the top and a policy; rules others put
there stay. Nothing is ever flushed except the chains owned here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .antispoof import antispoof_ruleset, set_specs
from .dns_rules import GUARD_CHAIN
from .errors import HotplugError, InvalidInput, KernelError, XenStoreUnavailable
from .firewall import ChainSpec, Family, Firewall, Hook, Policy, Rule, Ruleset
from .model import VIF_GROUP
from .sysctl import PROC_SYS, kernel_has_ipv6, swap_sysctl

log = logging.getLogger(__name__)

PROG = "vif-hotplug init"

INPUT_CHAIN = "QBS-INPUT"
INPUT_ADMIN_CHAIN = "QBS-INPUT-ADMIN"
FORWARD_CHAIN = "QBS-FORWARD-BASE"
FORWARD_ADMIN_CHAIN = "QBS-FORWARD"
POSTROUTING_CHAIN = "QBS-POSTROUTING"
DNS_CHAIN = "PR-QBS"
SERVICES_CHAIN = "PR-QBS-SERVICES"
DNS_GUARD_CHAIN = GUARD_CHAIN

_FROM_VM = f"-m devgroup --src-group {VIF_GROUP:#x}"
_TO_VM = f"-m devgroup --dst-group {VIF_GROUP:#x}"
_INVALID = "-m conntrack --ctstate INVALID -j DROP"
_ESTABLISHED = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"

#: ICMPv6 neighbour discovery (RFC 4861): router solicitation 133, router
#: advertisement 134, neighbour solicitation 135 and advertisement 136.
#: Conntrack marks them untracked, so they never count as ESTABLISHED.
ND_TYPES = (133, 134, 135, 136)
ICMP6_ROUTER_ADVERTISEMENT = 134
ICMP6_REDIRECT = 137



@dataclass(frozen=True, order=True)
class SysctlWrite:
    """A global sysctl, ``key`` relative to ``/proc/sys`` (``net/ipv4/ip_forward``)."""

    key: str
    value: str

    def __str__(self) -> str:
        return f"sysctl {self.key.replace('/', '.')}={self.value}"


@dataclass(frozen=True, order=True)
class SetSpec:
    """A kernel ip set that must exist (created when missing, never flushed)."""

    name: str
    stype: str
    family: int

    def __str__(self) -> str:
        return f"ipset create {self.name} {self.stype} family {'inet6' if self.family == 6 else 'inet'} (if missing)"


@dataclass(frozen=True)
class BasePlan:
    """Everything ``init`` ensures, in the order it is applied.

    Sets first (the raw rules reference them), then the firewall (policies
    DROP before forwarding opens), then the forwarding sysctls.
    """

    sets: tuple[SetSpec, ...]
    ruleset: Ruleset
    sysctls: tuple[SysctlWrite, ...]
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return (
            [str(s) for s in self.sets]
            + self.ruleset.lines()
            + [str(s) for s in self.sysctls]
            + [f"# {n}" for n in self.notes]
        )


def _merge(*rulesets: Ruleset) -> Ruleset:
    return Ruleset(
        chains=tuple(c for r in rulesets for c in r.chains),
        hooks=tuple(h for r in rulesets for h in r.hooks),
        policies=tuple(p for r in rulesets for p in r.policies),
    )


def _rules(*texts: str) -> tuple[Rule, ...]:
    return tuple(Rule(t) for t in texts)


def _nat(family: Family) -> Ruleset:
    """Masquerade what leaves towards anything but a VM or ``lo``."""
    chains = [ChainSpec(family, "nat", SERVICES_CHAIN, owned=False)]
    hooks = []
    position = 1
    if family == 4:
        # DNS DNAT is IPv4 only (README §6): no PR-QBS for ip6.
        chains.append(ChainSpec(family, "nat", DNS_CHAIN, owned=False))
        hooks.append(Hook(family, "nat", "PREROUTING", Rule(f"-j {DNS_CHAIN}"), position))
        position += 1
    hooks.append(Hook(family, "nat", "PREROUTING", Rule(f"-j {SERVICES_CHAIN}"), position))
    chains.append(
        ChainSpec(family, "nat", POSTROUTING_CHAIN, _rules(f"{_TO_VM} -j ACCEPT", "-o lo -j ACCEPT", "-j MASQUERADE"))
    )
    hooks.append(Hook(family, "nat", "POSTROUTING", Rule(f"-j {POSTROUTING_CHAIN}"), 1))
    return Ruleset(chains=tuple(chains), hooks=tuple(hooks))


def _forward_rules() -> tuple[Rule, ...]:
    return _rules(
        _INVALID,
        _ESTABLISHED,
        f"-j {FORWARD_ADMIN_CHAIN}",
        f"-m devgroup --src-group {VIF_GROUP:#x} --dst-group {VIF_GROUP:#x} -j DROP",
        f"{_FROM_VM} -j ACCEPT",
    )


def _filter(family: Family) -> Ruleset:
    """INPUT and FORWARD for a family that is on (forwarded and NATed)."""
    if family == 4:
        input_rules = _rules(
            _INVALID,
            # A VM's DHCP request: nothing here answers it; silence, not reject.
            f"-p udp {_FROM_VM} -m udp --dport 67 -j DROP",
            _ESTABLISHED,
            f"-j {INPUT_ADMIN_CHAIN}",
            f"-p icmp {_FROM_VM} -j ACCEPT",
            "-i lo -j ACCEPT",
            f"{_FROM_VM} -j REJECT --reject-with icmp-host-prohibited",
        )
    else:
        # python-iptables knows the protocol as "icmpv6", not /etc/protocols' "ipv6-icmp".
        icmp6 = "-p icmpv6"
        input_rules = _rules(
            _INVALID,
            # A VM must not become the netvm's router or redirect its traffic.
            f"{icmp6} {_FROM_VM} -m icmp6 --icmpv6-type {ICMP6_ROUTER_ADVERTISEMENT} -j DROP",
            f"{icmp6} {_FROM_VM} -m icmp6 --icmpv6-type {ICMP6_REDIRECT} -j DROP",
            # DHCPv6 requests from VMs, as udp 67 for IPv4.
            f"-p udp {_FROM_VM} -m udp --dport 547 -j DROP",
            _ESTABLISHED,
            f"-j {INPUT_ADMIN_CHAIN}",
            *(f"{icmp6} -m icmp6 --icmpv6-type {t} -j ACCEPT" for t in ND_TYPES),
            # DHCPv6 answers to the netvm's own uplink client: the request went to a
            # multicast group, so conntrack never sees the reply as ESTABLISHED.
            f"-d fe80::/64 -p udp -m devgroup ! --src-group {VIF_GROUP:#x} -m udp --dport 546 -j ACCEPT",
            f"{icmp6} {_FROM_VM} -j ACCEPT",
            "-i lo -j ACCEPT",
            f"{_FROM_VM} -j REJECT --reject-with icmp6-adm-prohibited",
        )
    dns_guard: tuple[ChainSpec, ...] = ()
    dns_hook: tuple[Hook, ...] = ()
    if family == 4:
        # The DNS tool's guard must see a VM's query before our "accept from
        # VMs" does, whichever of the two commands runs first: both ensure the
        # jump at the top, ours goes below it. The chain's rules are the DNS
        # tool's (reserved here).
        dns_guard = (ChainSpec(4, "filter", DNS_GUARD_CHAIN, owned=False),)
        dns_hook = (Hook(4, "filter", "FORWARD", Rule(f"-j {DNS_GUARD_CHAIN}"), 1),)
    return Ruleset(
        chains=(
            ChainSpec(family, "filter", INPUT_ADMIN_CHAIN, owned=False),
            ChainSpec(family, "filter", FORWARD_ADMIN_CHAIN, owned=False),
            *dns_guard,
            ChainSpec(family, "filter", INPUT_CHAIN, input_rules),
            ChainSpec(family, "filter", FORWARD_CHAIN, _forward_rules()),
        ),
        hooks=(
            Hook(family, "filter", "INPUT", Rule(f"-j {INPUT_CHAIN}"), 1),
            *dns_hook,
            Hook(family, "filter", "FORWARD", Rule(f"-j {FORWARD_CHAIN}"), 1 + len(dns_hook)),
        ),
        policies=(
            Policy(family, "filter", "INPUT", "DROP"),
            Policy(family, "filter", "FORWARD", "DROP"),
        ),
    )


def _ipv6_closed() -> Ruleset:
    """IPv6 off: nothing is forwarded, only ``lo`` may talk to the netvm."""
    return Ruleset(
        chains=(
            ChainSpec(6, "filter", INPUT_CHAIN, _rules("-i lo -j ACCEPT")),
            ChainSpec(6, "filter", FORWARD_CHAIN, _rules("-j DROP")),
        ),
        hooks=(
            Hook(6, "filter", "INPUT", Rule(f"-j {INPUT_CHAIN}"), 1),
            Hook(6, "filter", "FORWARD", Rule(f"-j {FORWARD_CHAIN}"), 1),
        ),
        policies=(
            Policy(6, "filter", "INPUT", "DROP"),
            Policy(6, "filter", "FORWARD", "DROP"),
        ),
    )


def plan_base_ruleset(ipv6: bool, ipv6_in_kernel: bool = True) -> Ruleset:
    """The base firewall of a netvm. Pure.

    ``ipv6``: the netvm forwards IPv6 (``NetvmParams.ipv6``); when off, ip6
    filter drops all forwarding and accepts only ``lo`` input.
    ``ipv6_in_kernel``: when false nothing ip6 is planned at all (there is
    no ip6tables without kernel IPv6).

    Reserved chains come before the owned chains that jump to them, so a
    backend creating chains in order never references a missing one.
    """
    families: tuple[Family, ...] = (4, 6) if ipv6_in_kernel else (4,)
    parts = [antispoof_ruleset(families), _nat(4), _filter(4)]
    if ipv6_in_kernel:
        parts += [_nat(6), _filter(6)] if ipv6 else [_ipv6_closed()]
    return _merge(*parts)


def plan_base(ipv6: bool, ipv6_in_kernel: bool = True) -> BasePlan:
    """Sets, firewall and sysctls of the base set-up. Pure.

    IPv6 forwarding is only ever switched on, never off: with IPv6 off the
    ip6 FORWARD policy already drops everything, and the sysctl may matter
    to something else on this machine.
    """
    families = (4, 6) if ipv6_in_kernel else (4,)
    sysctls = [SysctlWrite("net/ipv4/ip_forward", "1")]
    notes: list[str] = []
    if not ipv6_in_kernel:
        notes.append("the kernel has no IPv6: nothing ip6 planned")
    elif ipv6:
        sysctls.append(SysctlWrite("net/ipv6/conf/all/forwarding", "1"))
    else:
        notes.append("netvm IPv6 is off: ip6 forwarding dropped, ip6 input only from lo")
    return BasePlan(
        sets=tuple(SetSpec(n, t, f) for n, t, f in set_specs(families)),
        ruleset=plan_base_ruleset(ipv6, ipv6_in_kernel),
        sysctls=tuple(sysctls),
        notes=tuple(notes),
    )


# --- thin shell ----------------------------------------------------------


def ensure_sysctl(write: SysctlWrite, proc_sys: str = PROC_SYS) -> bool:
    """Set the sysctl in this network namespace; ``True`` if it changed. Raises ``KernelError``."""
    try:
        return swap_sysctl(os.path.join(proc_sys, write.key), write.value) is not None
    except OSError as exc:
        raise KernelError(f"cannot set {write}: {exc.strerror}") from exc


def apply_base(plan: BasePlan, firewall: Firewall) -> int:
    """Apply ``plan`` in order; return the number of things that changed.

    Idempotent: a second call returns 0. Raises ``HotplugError`` subclasses;
    a failure leaves what was already applied (each part is safe alone).
    """
    from .kernel_sets import KernelSets

    sets = KernelSets()
    try:
        for s in plan.sets:
            sets.ensure_set(s.name, s.stype, s.family)
    finally:
        sets.close()
    changes = 0
    if firewall.sync(plan.ruleset):
        log.info("firewall: base ruleset committed")
        changes += 1
    for write in plan.sysctls:
        if ensure_sysctl(write):
            log.info("%s", write)
            changes += 1
    return changes


def load_ipv6(env: Mapping[str, str]) -> bool:
    """Whether the netvm's IPv6 is on, from netvm.conf, QubesDB or XenStore.

    No source at all (or XenStore down) means off: fail closed, warn.
    Raises ``InvalidInput`` for a bad value in the source that has one.
    """
    from .netvm_params import load_netvm_params
    from .xenstore_client import XenStore

    try:
        params = load_netvm_params(env, connect=lambda: XenStore(env))
    except XenStoreUnavailable as exc:
        log.warning("netvm parameters unavailable (%s): IPv6 treated as off", exc)
        return False
    log.debug("netvm parameters from %s: ipv6=%s", params.source, params.ipv6)
    return params.ipv6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Set up the base firewall, anti-spoofing and forwarding of a network-providing "
        "domain (Qubes 4.0 semantics). Idempotent; touches only its own chains, a jump and a policy "
        "in the builtin ones, and the reserved chains' existence.",
        epilog="environment: VIF_HOTPLUG_CONF (netvm.conf: ipv6, gateway6), XENSTORED_PATH, "
        "XTABLES_LOCKFILE. exit status: 0 success (changed or not), 1 error, 2 usage.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every change (and the plan) to stderr")
    p.add_argument("-n", "--dry-run", action="store_true", help="print the plan and change nothing")
    return p


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The whole command; returns the exit status (never calls ``sys.exit``).

    A bad netvm.conf does not leave the machine open: the ruleset is applied
    with IPv6 off and the exit status is 1.
    """
    from .hotplug_log import configure

    env = dict(os.environ if env is None else env)
    try:
        ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help and usage errors
        return int(exc.code or 0)
    configure(PROG, ns.verbose)

    status = 0
    try:
        ipv6 = load_ipv6(env)
    except InvalidInput as exc:
        log.error("%s: applying with IPv6 off", exc)
        ipv6, status = False, 1
    plan = plan_base(ipv6, kernel_has_ipv6())
    for line in plan.lines():
        log.debug("plan: %s", line)
    if ns.dry_run:
        print("\n".join(plan.lines()))
        return status

    from .iptables_backend import FamilyIsolatedFirewall, IptablesFirewall

    try:
        changes = apply_base(plan, FamilyIsolatedFirewall(IptablesFirewall))
    except HotplugError as exc:
        log.error("%s", exc)
        return 1
    if changes:
        log.info("base set-up applied: %d change(s)", changes)
    else:
        log.info("base set-up already in place: nothing changed")
    return status
