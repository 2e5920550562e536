"""The constant part of anti-spoofing: two kernel sets per family and a raw chain.

Per-vif work only adds or removes set members, so neither the rules a packet
walks nor the work of a hotplug event grows with the number of VMs:

* ``qbs-allowed4/6`` (``hash:net,iface``): (source, vif) pairs a VM may use;
* ``qbs-downstream4/6`` (``hash:net``): every address that lives behind a vif.

raw PREROUTING jumps to ``QBS-ANTISPOOF``, which drops a packet from a VM
interface (interface group 2) unless (source, in-interface) is allowed, and
a packet from any other interface whose source is a downstream address. A
vif with no IPv6 member has no allowed IPv6 source, so it passes no IPv6.
"""

from __future__ import annotations

from .firewall import ChainSpec, Family, Hook, Rule, Ruleset
from .model import VIF_GROUP

CHAIN = "QBS-ANTISPOOF"
ALLOWED: dict[int, str] = {4: "qbs-allowed4", 6: "qbs-allowed6"}
DOWNSTREAM: dict[int, str] = {4: "qbs-downstream4", 6: "qbs-downstream6"}


def set_specs(families: tuple[int, ...]) -> list[tuple[str, str, int]]:
    """(name, ipset type, family) of every set, in creation order."""
    out: list[tuple[str, str, int]] = []
    for fam in families:
        out.append((ALLOWED[fam], "hash:net,iface", fam))
        out.append((DOWNSTREAM[fam], "hash:net", fam))
    return out


def antispoof_ruleset(families: tuple[int, ...]) -> Ruleset:
    chains = []
    hooks = []
    for fam in families:
        family: Family = 6 if fam == 6 else 4
        rules = (
            Rule(f"-m devgroup --src-group {VIF_GROUP:#x} -m set ! --match-set {ALLOWED[fam]} src,src -j DROP"),
            Rule(f"-m devgroup ! --src-group {VIF_GROUP:#x} -m set --match-set {DOWNSTREAM[fam]} src -j DROP"),
        )
        chains.append(ChainSpec(family, "raw", CHAIN, rules))
        hooks.append(Hook(family, "raw", "PREROUTING", Rule(f"-j {CHAIN}")))
    return Ruleset(chains=tuple(chains), hooks=tuple(hooks))
