"""The firewall state of a namespace, read with the distribution's tools, in one backend-independent form.

Tests assert on this, not on one backend's strings: a normaliser over
``nft -j list ruleset`` (JSON only) and over ``iptables-legacy-save`` /
``ip6tables-legacy-save`` plus ``ipset list``. Chains and sets get their
logical names (those of current Qubes' nftables layout); rules become
canonical text close to nft's syntax, the same for both backends:

* ``iifgroup 2 goto antispoof``, ``oifgroup != 2 ip daddr @connected drop``,
  ``iifname . ip saddr @allowed accept``, ``udp dport 68 iifgroup 2 drop``...
* counters are left out; ``iif lo`` and ``iifname lo`` both read ``iifname lo``;
  an iptables ``RETURN`` in the raw/mangle chains reads ``accept`` (what it
  means there); ``meta l4proto X`` reads ``proto X``; predicates are sorted.

Nothing here imports the package's own adapters: the tests check the kernel
with independent eyes (the layout table of chain names is the only shared fact).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vif_hotplug.kernel.iptables_backend import NAMES

Run = Callable[..., Any]

#: iptables chain name -> logical name, for table "qubes" (and "qubes-nat").
LOGICAL = {x.name: chain for (table, chain), x in NAMES.items() if table == "qubes"}
LOGICAL_NAT = {x.name: chain for (table, chain), x in NAMES.items() if table == "qubes-nat"}
_ICMP6 = {"nd-router-advert": "134", "nd-redirect": "137"}


@dataclass
class FirewallState:
    backend: str
    #: (family, logical chain) -> canonical rules, in order.
    chains: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    #: (family, logical set) -> members ("10.137.0.5" or "vif4.0 . 10.137.0.5").
    sets: dict[tuple[int, str], set[str]] = field(default_factory=dict)
    #: (family, hook) -> our base chains at that hook, in the order packets meet them
    #: (nftables: by priority; iptables: by the table the jump is in, then its place).
    hooks: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    #: (family, base chain) -> policy.
    policies: dict[tuple[int, str], str] = field(default_factory=dict)
    #: Tables (nft) or chains (iptables) that are not ours, as "family table chain".
    foreign: set[str] = field(default_factory=set)

    def chain(self, family: int, name: str) -> list[str]:
        return self.chains.get((family, name), [])

    def members(self, family: int, name: str) -> set[str]:
        return self.sets.get((family, name), set())

    def has_chain(self, family: int, name: str) -> bool:
        return (family, name) in self.chains

    def dnat(self) -> list[tuple[str, str, str]]:
        """(virtual, proto, upstream) of every DNAT rule of chain dnat-dns, in order."""
        out = []
        for r in self.chain(4, "dnat-dns"):
            m = re.fullmatch(r"ip daddr (\S+) (udp|tcp) dport 53 dnat to (\S+)", r)
            if m:
                out.append((m.group(1), m.group(2), m.group(3)))
        return out

    def guarded(self) -> list[str]:
        """Virtual resolvers the DNS guard rejects (each once)."""
        return list(dict.fromkeys(re.findall(r"ip daddr (\S+)", " ".join(self.chain(4, "dns-guard")))))


def _canon(words: list[str]) -> str:
    """Predicates sorted, the verdict last: one spelling whatever the backend's order."""
    verdicts = ("accept", "drop", "reject", "jump", "goto", "dnat", "snat", "masquerade")
    for i, w in enumerate(words):
        if w.split()[0] in verdicts:
            return " ".join(sorted(words[:i]) + words[i:])
    return " ".join(sorted(words))


# --- nftables ----------------------------------------------------------------------------


def _nft_value(v: Any) -> str:
    if isinstance(v, dict) and "prefix" in v:
        return f"{v['prefix']['addr']}/{v['prefix']['len']}"
    if isinstance(v, dict) and "set" in v:
        return "{" + ",".join(sorted(_ICMP6.get(str(x), str(x)) for x in v["set"])) + "}"
    if isinstance(v, list):
        return ",".join(sorted(str(x) for x in v))
    return _ICMP6.get(str(v), str(v))


def _nft_left(left: dict[str, Any], family: str) -> str:
    if "meta" in left:
        key = left["meta"]["key"]
        return {"iif": "iifname", "oif": "oifname", "l4proto": "proto"}.get(key, key)
    if "payload" in left:
        p = left["payload"]
        if p["field"] in ("saddr", "daddr"):
            return f"{family} {p['field']}"
        return f"{p['protocol']} {p['field']}"
    if "ct" in left:
        return "ct state"
    if "concat" in left:
        return " . ".join(_nft_left(x, family) for x in left["concat"])
    return json.dumps(left)


def _nft_rule(expr: list[dict[str, Any]], family: str) -> str:
    words: list[str] = []
    for e in expr:
        if "match" in e:
            m = e["match"]
            op = "!= " if m["op"] == "!=" else ""
            right = m["right"]
            if isinstance(right, str) and right.startswith("@"):
                right = "@" + right[1:].removesuffix("-nets")
            value = _nft_value(right)
            if _nft_left(m["left"], family) == "proto" and value == "ipv6-icmp":
                value = "icmpv6"
            words.append(f"{_nft_left(m['left'], family)} {op}{value}")
        elif "counter" in e:
            continue
        elif "reject" in e:
            r = e["reject"] or {}
            kind = r.get("expr") or ("tcp-reset" if r.get("type") == "tcp reset" else "port-unreachable")
            words.append(f"reject {kind}")
        elif "jump" in e or "goto" in e:
            k = "jump" if "jump" in e else "goto"
            words.append(f"{k} {e[k]['target']}")
        elif "dnat" in e or "snat" in e:
            k = "dnat" if "dnat" in e else "snat"
            words.append(f"{k} to {e[k]['addr']}")
        else:
            words.append(next(iter(e)))
    return _canon(words)


def read_nft(run: Run) -> FirewallState:
    state = FirewallState("nftables")
    data = json.loads(run("nft", "-j", "list", "ruleset").stdout or '{"nftables": []}')["nftables"]
    base: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for item in data:
        if "chain" in item:
            c = item["chain"]
            fam = 6 if c["family"] == "ip6" else 4
            if c["table"] != "qubes":
                state.foreign.add(f"{c['family']} {c['table']} {c['name']}")
                continue
            state.chains.setdefault((fam, c["name"]), [])
            if "hook" in c:
                base.setdefault((fam, c["hook"]), []).append((c["prio"], c["name"]))
                state.policies[(fam, c["name"])] = c.get("policy", "accept")
        elif "rule" in item:
            r = item["rule"]
            if r["table"] != "qubes":
                continue
            fam = 6 if r["family"] == "ip6" else 4
            text = _nft_rule(r["expr"], r["family"])
            rules = state.chains.setdefault((fam, r["chain"]), [])
            if text not in rules or "@" not in text:  # the -nets twin of a lookup reads the same
                rules.append(text)
        elif "set" in item:
            s = item["set"]
            if s["table"] != "qubes":
                continue
            fam = 6 if s["family"] == "ip6" else 4
            members = state.sets.setdefault((fam, s["name"].removesuffix("-nets")), set())
            for e in s.get("elem", []):
                if isinstance(e, dict) and "elem" in e:
                    e = e["elem"]["val"]
                if isinstance(e, dict) and "concat" in e:
                    members.add(" . ".join(_nft_value(x) for x in e["concat"]))
                else:
                    members.add(_nft_value(e))
    for key, chains in base.items():
        state.hooks[key] = [name for _, name in sorted(chains)]
    return state


# --- iptables ------------------------------------------------------------------------------

_SET = re.compile(r"qbs-(allowed|downstream|connected)([46])")


def _ipt_rule(args: list[str], family: int, table: str) -> str:
    ip = "ip6" if family == 6 else "ip"
    words: list[str] = []
    i, neg = 0, ""
    proto = None
    while i < len(args):
        a = args[i]
        if a == "!":
            neg = "!= "
            i += 1
            continue
        if a in ("-i", "-o"):
            name = args[i + 1]
            # xtables' interface prefix match is a trailing "+", nft's a "*": one form here.
            name = name[:-1] + "*" if name.endswith("+") else name
            words.append(f"{'iifname' if a == '-i' else 'oifname'} {neg}{name}")
            i += 2
        elif a in ("-s", "-d"):
            addr = args[i + 1].removesuffix("/32").removesuffix("/128")
            words.append(f"{ip} {'saddr' if a == '-s' else 'daddr'} {neg}{addr}")
            i += 2
        elif a == "-p":
            proto = args[i + 1]
            words.append(f"proto {neg}{'icmpv6' if proto == 'ipv6-icmp' else proto}")
            i += 2
        elif a == "-m":
            i += 2
        elif a in ("--src-group", "--dst-group"):
            words.append(f"{'iifgroup' if a == '--src-group' else 'oifgroup'} {neg}{int(args[i + 1], 16)}")
            i += 2
        elif a == "--match-set":
            m = _SET.fullmatch(args[i + 1])
            name = m.group(1) if m else args[i + 1]
            flags = args[i + 2]
            key = f"iifname . {ip} saddr" if flags == "src,src" else f"{ip} {'saddr' if flags == 'src' else 'daddr'}"
            words.append(f"{key} {neg}@{name}")
            i += 3
        elif a == "--dport":
            words = [w for w in words if w != f"proto {proto}"]
            words.append(f"{proto} dport {args[i + 1]}")
            i += 2
        elif a in ("--icmp-type", "--icmpv6-type"):
            words = [w for w in words if not w.startswith("proto icmp")]
            words.append(f"{'icmpv6' if family == 6 else 'icmp'} type {args[i + 1]}")
            i += 2
        elif a == "--ctstate":
            words.append("ct state " + ",".join(sorted(s.lower() for s in args[i + 1].split(","))))
            i += 2
        elif a in ("-j", "-g"):
            target = args[i + 1]
            rest = args[i + 2:]
            if target in ("ACCEPT", "DROP", "MASQUERADE"):
                words.append(target.lower())
            elif target == "RETURN":
                words.append("accept" if table in ("raw", "mangle") else "return")
            elif target == "REJECT":
                kind = rest[1] if len(rest) > 1 else "port-unreachable"
                kind = {"icmp-host-prohibited": "host-prohibited", "icmp-port-unreachable": "port-unreachable",
                        "icmp6-adm-prohibited": "admin-prohibited"}.get(kind, kind)
                if kind == "tcp-reset":
                    words = [w for w in words if w != "proto tcp"]
                words.append(f"reject {kind}")
            elif target in ("DNAT", "SNAT"):
                words.append(f"{target.lower()} to {rest[1]}")
            else:
                name = LOGICAL.get(target, LOGICAL_NAT.get(target, target))
                words.append(f"{'goto' if a == '-g' else 'jump'} {name}")
            break
        else:
            i += 1
        neg = ""
    return _canon(words)


#: The order xtables tables see a packet at one hook (raw first, filter after nat's DNAT).
_TABLE_ORDER = {"raw": 0, "mangle": 1, "nat": 2, "filter": 3, "security": 4}


def read_iptables(run: Run) -> FirewallState:
    state = FirewallState("iptables")
    jumps: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for family, tool in ((4, "iptables-legacy-save"), (6, "ip6tables-legacy-save")):
        table = ""
        for line in run(tool).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":"):
                name, policy = line[1:].split()[:2]
                logical = LOGICAL.get(name)
                if logical is not None:
                    state.chains.setdefault((family, logical), [])
                elif policy == "-":
                    state.foreign.add(f"{family} {table} {name}")
                elif policy in ("ACCEPT", "DROP") and table == "filter" and name in ("INPUT", "FORWARD"):
                    # The builtin chain's policy is that of our base chain there.
                    state.policies[(family, name.lower())] = policy.lower()
            elif line.startswith("-A "):
                args = shlex.split(line)
                chain = args[1]
                logical = LOGICAL.get(chain)
                if logical is not None:
                    state.chains[(family, logical)].append(_ipt_rule(args[2:], family, table))
                elif len(args) == 4 and args[2] == "-j" and args[3] in LOGICAL:
                    jumps.setdefault((family, chain.lower()), []).append((_TABLE_ORDER[table], LOGICAL[args[3]]))
                else:
                    state.foreign.add(f"{family} {table} {chain} {' '.join(args[2:])}")
    for key, found in jumps.items():
        state.hooks[key] = [name for _, name in sorted(found, key=lambda x: x[0])]
    current = None
    in_members = False
    for line in run("ipset", "list").stdout.splitlines():
        if line.startswith("Name: "):
            m = _SET.fullmatch(line[6:])
            current = (int(m.group(2)), m.group(1)) if m else None
            in_members = False
            if current is not None:
                state.sets.setdefault(current, set())
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and current is not None and line.strip():
            member = line.strip()
            if "," in member:
                addr, dev = member.split(",", 1)
                member = f"{dev} . {addr.removesuffix('/32').removesuffix('/128')}"
            else:
                member = member.removesuffix("/32").removesuffix("/128")
            state.sets[current].add(member)
    return state


def read_firewall(run: Run, backend: str) -> FirewallState:
    """The namespace's firewall as ``backend`` holds it."""
    return read_nft(run) if backend == "nftables" else read_iptables(run)


#: The administrator's chains: they stay wherever they are.
RESERVED = frozenset({"custom-input", "custom-forward", "services"})


def other_backend_is_empty(run: Run, backend: str) -> bool:
    """Nothing of this package in the backend not in use (the administrator's reserved chains may stay)."""
    other = read_iptables(run) if backend == "nftables" else read_nft(run)
    ours = [c for (_, c) in other.chains if c not in RESERVED]
    return not ours and not other.sets
