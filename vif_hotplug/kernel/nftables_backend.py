"""Firewall backend on nftables, through libnftables' JSON API (the ``nftables`` module).

Layout: the logical names are the real ones (tables ``ip qubes`` and
``ip6 qubes``, chains ``prerouting``, ``antispoof``, ...), as in current
Qubes. Facts this module is built around:

* Every change is one ``json_cmd`` call: libnftables sends it as one batch,
  which the kernel commits atomically or not at all.
* A set with ``flags interval`` makes libnftables fetch all its elements
  before every element change (measured: 0.25 ms per change with none,
  6.3 ms with 1000). The sets of Qubes' layout are plain hash sets, which
  cannot hold prefixes; a VM given a whole network (as Xen allows) gets its
  element in a companion ``<set>-nets`` interval set, which stays empty
  otherwise, and every lookup rule is doubled for it.
* Rules read back with ``-j list`` come out as they went in, except that a
  counter carries its numbers and ``reject with tcp reset`` needs no
  protocol match (nft adds it): rules are rendered in that same form, so
  comparing the two lists of expressions tells what differs.
* Listings are terse (no set elements), so ensuring the chains costs the
  same with 1000 VMs as with none.
* Flow offload (:class:`~vif_hotplug.core.firewall.FlowOffload`) lives in
  a table of its own, ``inet qubes-nat-accel`` as in current Qubes. Whether
  the kernel can have a flowtable at all is asked by sending the whole
  table in a batch that is never committed (libnftables' dry run, ``nft
  -c``: the batch goes without its end message, so the kernel validates
  every command, flowtable type and ``flow add`` expression included, then
  aborts it). Without ``CONFIG_NF_FLOW_TABLE`` the kernel answers ENOENT.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from ipaddress import ip_network
from typing import Any, Literal

from ..core.errors import KernelError
from ..core.firewall import (
    NETWORK_SETS,
    SET_NAMES,
    Accept,
    Addr,
    Chain,
    CtState,
    Dnat,
    DPort,
    Drop,
    Family,
    FlowOffload,
    FlowtableDevice,
    Goto,
    IcmpType,
    IfGroup,
    IfName,
    InSet,
    Jump,
    Masquerade,
    Predicate,
    Proto,
    Reject,
    Rule,
    Ruleset,
    SetElement,
    SetName,
    Snat,
    Table,
    Verdict,
)
from ..core.plan_base import ACCEL_TABLE, TABLE
from .locks import file_lock
from .netns import thread_netns
from .nfnl import Nfnl, nft_key
from .set_dump import nft_members
from .verified import VerifiedRulesets

log = logging.getLogger(__name__)

Json = dict[str, Any]
NETS_SUFFIX = "-nets"
_EINTR_RETRIES = 5
#: Chains this package may ever create in ``qubes`` (besides the reserved ones).
OWNED_CHAINS = ("prerouting", "antispoof", "downstream-out", "postrouting", "input", "forward", "_icmpv6",
                "dnat-dns", "dns-guard")
RESERVED_CHAINS = ("custom-input", "custom-forward")
#: Logical chains current Qubes' layout has no place for (Qubes 4.0's reserved
#: nat chain lives on in the iptables layout only).
NOT_IN_LAYOUT = frozenset({"services"})

_REJECT: dict[str, Json] = {
    "icmp-host-prohibited": {"type": "icmp", "expr": "host-prohibited"},
    "icmp-port-unreachable": {"type": "icmp", "expr": "port-unreachable"},
    "icmp6-adm-prohibited": {"type": "icmpv6", "expr": "admin-prohibited"},
    "tcp-reset": {"type": "tcp reset"},
}


#: The throw-away table of the flowtable probe; the probe's batch is never committed.
PROBE_TABLE = "qubes-nat-accel-probe"
#: nft's ``priority filter`` of a flowtable's ingress hook.
_PROBE = """add table inet {t}
add flowtable inet {t} ft {{ hook ingress priority 0; }}
add chain inet {t} c {{ type filter hook forward priority 5; policy accept; }}
add rule inet {t} c meta l4proto {{ tcp, udp }} iifgroup 2 oifgroup 1 flow add @ft
"""


def _token(generation: int) -> str:
    return f"nftables generation {generation}"


def _fam(family: Family) -> str:
    return "ip6" if family == 6 else "ip"


def _match(left: Json, right: Any, negate: bool = False, op: str = "==") -> Json:
    return {"match": {"op": "!=" if negate else op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _payload(proto: str, field: str) -> Json:
    return {"payload": {"protocol": proto, "field": field}}


def _address(network: str) -> Any:
    net = ip_network(network)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _is_host(network: str) -> bool:
    net = ip_network(network)
    return net.prefixlen == net.max_prefixlen


def _predicate(p: Predicate, family: Family, set_name: str | None) -> Json | None:
    if isinstance(p, IfName):
        key = ("i" if p.direction == "in" else "o") + ("if" if p.by_index else "ifname")
        return _match(_meta(key), p.name, p.negate)
    if isinstance(p, IfGroup):
        return _match(_meta("iifgroup" if p.direction == "in" else "oifgroup"), p.group, p.negate)
    if isinstance(p, Addr):
        return _match(_payload(_fam(family), "saddr" if p.direction == "src" else "daddr"), _address(p.network),
                      p.negate)
    if isinstance(p, InSet):
        addr = _payload(_fam(family), "saddr" if p.direction == "src" else "daddr")
        left = {"concat": [_meta("iifname"), addr]} if p.with_interface else addr
        return _match(left, f"@{set_name}")
    if isinstance(p, Proto):
        return _match(_meta("l4proto"), "ipv6-icmp" if p.proto == "icmpv6" else p.proto, p.negate)
    if isinstance(p, DPort):
        return _match(_payload(p.proto, "dport"), p.port)
    if isinstance(p, IcmpType):
        shown = p.names(family)
        right: Any = shown[0] if len(shown) == 1 else {"set": shown}
        return _match(_payload("icmpv6" if family == 6 else "icmp", "type"), right)
    if isinstance(p, CtState):
        return _match({"ct": {"key": "state"}}, p.states[0] if len(p.states) == 1 else list(p.states), op="in")
    raise TypeError(p)


def _verdict(v: Verdict) -> Json:
    if isinstance(v, Accept):
        return {"accept": None}
    if isinstance(v, Drop):
        return {"drop": None}
    if isinstance(v, Reject):
        return {"reject": dict(_REJECT[v.kind])}
    if isinstance(v, Jump):
        return {"jump": {"target": v.chain}}
    if isinstance(v, Goto):
        return {"goto": {"target": v.chain}}
    if isinstance(v, Dnat):
        return {"dnat": {"addr": v.to}}
    if isinstance(v, Snat):
        return {"snat": {"addr": v.to}}
    if isinstance(v, Masquerade):
        return {"masquerade": None}
    raise TypeError(v)


def render_rule(r: Rule, family: Family) -> list[list[Json]]:
    """The expression lists of one rule: one per physical set when it looks a set up."""
    lookups = [p for p in r.match if isinstance(p, InSet)]
    variants: list[str | None] = [None]
    if lookups:
        name = lookups[0].set
        variants = [name, name + NETS_SUFFIX] if name in NETWORK_SETS else [name]
    out = []
    for set_name in variants:
        expr: list[Json] = []
        for p in r.match:
            if r.implied(p):
                continue
            rendered = _predicate(p, family, set_name)
            if rendered is not None:
                expr.append(rendered)
        if r.counter:
            expr.append({"counter": None})
        if r.verdict is not None:
            expr.append(_verdict(r.verdict))
        out.append(expr)
    return out


def _normalise(expr: list[Json]) -> list[Json]:
    return [{"counter": None} if "counter" in e else e for e in expr]


def _chain_spec(family: Family, table: str, chain: Chain) -> Json:
    spec: Json = {"family": _fam(family), "table": table, "name": chain.name}
    if chain.hook is not None:
        spec.update(type=chain.hook.type, hook=chain.hook.hook, prio=chain.hook.priority, policy=chain.hook.policy)
    return spec


def _set_specs(family: Family, table: str, name: SetName) -> list[Json]:
    addr = "ipv6_addr" if family == 6 else "ipv4_addr"
    key: Any = ["ifname", addr] if name == "allowed" else addr
    base = {"family": _fam(family), "table": table, "type": key}
    if name not in NETWORK_SETS:
        return [dict(base, name=name)]
    return [dict(base, name=name), dict(base, name=name + NETS_SUFFIX, flags=["interval"])]


def _element_value(e: SetElement) -> Any:
    addr = _address(e.network)
    return {"concat": [e.dev, addr]} if e.dev is not None else addr


def _offload_commands(f: FlowOffload) -> list[Json]:
    """The batch that (re)creates ``f`` whole: its table dropped and made again (as current Qubes
    does at every online), so nothing of an older layout stays."""
    table = {"family": "inet", "name": f.table}
    flowtable: Json = {"family": "inet", "table": f.table, "name": f.flowtable, "hook": "ingress",
                       "prio": f.ingress_priority}
    if f.devices:
        flowtable["dev"] = list(f.devices)
    chain = {"family": "inet", "table": f.table, "name": f.flowtable, "type": "filter", "hook": "forward",
             "prio": f.forward_priority, "policy": "accept"}
    return [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}},
            {"add": {"flowtable": flowtable}}, {"add": {"chain": chain}},
            {"add": {"rule": {"family": "inet", "table": f.table, "chain": f.flowtable, "expr": _offload_rule(f)}}}]


def _offload_rule(f: FlowOffload) -> list[Json]:
    return [_match(_meta("l4proto"), {"set": ["tcp", "udp"]}), _match(_meta("iifgroup"), f.from_group),
            _match(_meta("oifgroup"), f.to_group), {"flow": {"op": "add", "flowtable": f"@{f.flowtable}"}}]


def _devices(spec: Json) -> set[str]:
    dev = spec.get("dev", [])
    return {dev} if isinstance(dev, str) else set(dev)


def _offload_drift(f: FlowOffload, items: list[Json] | None) -> list[str]:
    """What keeps the kernel's ``inet`` table of ``f`` from being ``f`` (``items``: its listing,
    ``None`` when missing). Devices beyond ``f``'s are vifs their online added: not a difference."""
    where = f"inet {f.table}"
    if items is None:
        return [f"table {where} missing"]
    tables = {k: [i[k] for i in items if k in i] for k in ("flowtable", "chain", "rule")}
    ft = next((x for x in tables["flowtable"] if x.get("name") == f.flowtable), None)
    chain = next((x for x in tables["chain"] if x.get("name") == f.flowtable), None)
    rules = [_normalise(r["expr"]) for r in tables["rule"] if r.get("chain") == f.flowtable]
    out = []
    if ft is None or (ft.get("hook"), ft.get("prio")) != ("ingress", f.ingress_priority):
        out.append(f"flowtable {where} {f.flowtable} missing or on another hook")
    elif set(f.devices) - _devices(ft):
        out.append(f"flowtable {where} {f.flowtable} lacks {', '.join(sorted(set(f.devices) - _devices(ft)))}")
    if chain is None or (chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy")) != (
            "filter", "forward", f.forward_priority, "accept") or rules != [_offload_rule(f)]:
        out.append(f"chain {where} {f.flowtable} missing or differs")
    return out


class _Current:
    """What one table holds now: chains (spec, rule expressions) and set names."""

    def __init__(self, items: Iterable[Json]) -> None:
        self.exists = False
        self.chains: dict[str, Json] = {}
        self.rules: dict[str, list[list[Json]]] = {}
        self.sets: set[str] = set()
        for item in items:
            if "table" in item:
                self.exists = True
            elif "chain" in item:
                self.chains[item["chain"]["name"]] = item["chain"]
                self.rules.setdefault(item["chain"]["name"], [])
            elif "rule" in item:
                self.rules.setdefault(item["rule"]["chain"], []).append(_normalise(item["rule"]["expr"]))
            elif "set" in item:
                self.sets.add(item["set"]["name"])


def _same_hook(have: Json, chain: Chain) -> bool:
    if chain.hook is None:
        return "hook" not in have
    h = chain.hook
    return (have.get("type"), have.get("hook"), have.get("prio")) == (h.type, h.hook, h.priority)


class NftablesBackend:
    """:class:`~vif_hotplug.kernel.firewall_backend.FirewallBackend` on libnftables."""

    name: Literal["nftables"] = "nftables"

    def __init__(self, lock_path: str, lock_timeout: float, netns: str | None = None,
                 verified_path: str | None = None) -> None:
        self._lock_path = lock_path
        self._lock_timeout = lock_timeout
        #: The namespace whose firewall this is; every call runs with the thread inside it.
        self._netns = netns
        self._nft: Any = None
        self._nfnl: Nfnl | None = None
        #: Rulesets found complete, with the ruleset generation they were
        #: found in: while the kernel's generation stays there (or moves on
        #: only by this backend's own element commits), they still are.
        self._verified = VerifiedRulesets(verified_path)

    def _ctx(self) -> Any:
        if self._nft is None:
            try:
                import nftables
            except ImportError as exc:
                raise KernelError(f"cannot load the nftables Python module (python3-nftables): {exc}") from exc
            try:
                # libnftables opens its netlink socket with the context: in our namespace.
                with thread_netns(self._netns):
                    nft = nftables.Nftables()
            except OSError as exc:
                raise KernelError(f"cannot load libnftables: {exc}") from exc
            nft.set_json_output(True)
            nft.set_handle_output(False)
            self._nft = nft
        return self._nft

    def _netlink(self) -> Nfnl:
        if self._nfnl is None:
            nfnl = Nfnl()
            with thread_netns(self._netns):
                nfnl.open()  # the socket belongs to the namespace it is opened in
            self._nfnl = nfnl
        return self._nfnl

    def _genid(self) -> int:
        try:
            return self._netlink().nft_genid()
        except OSError as exc:
            raise KernelError(f"cannot read the nftables generation: {exc.strerror}") from exc

    def close(self) -> None:
        self._verified.flush()
        self._nft = None
        if self._nfnl is not None:
            self._nfnl.close()
            self._nfnl = None

    def _run(self, commands: list[Json], what: str) -> Any:
        rc, out, err = self._try(commands)
        if rc != 0:
            raise KernelError(f"nftables {what}: {_first_error(err)}")
        return out

    def _try(self, commands: list[Json]) -> tuple[int, Any, str]:
        for _ in range(_EINTR_RETRIES):
            with thread_netns(self._netns):
                rc, out, err = self._ctx().json_cmd({"nftables": commands})
            # A listing that another process's commit interrupted (the
            # kernel flags the dump, libnftables gives up with EINTR): again.
            if rc == 0 or "Interrupted system call" not in (err or ""):
                break
        return rc, out, err or ""

    def _in(self, netns: str | None) -> NftablesBackend:
        """This backend for the firewall of namespace ``netns`` (itself for ``None``)."""
        if netns is None or netns == self._netns:
            return self
        return NftablesBackend(self._lock_path, self._lock_timeout, netns)

    def _list_table(self, family: Family, table: str) -> _Current:
        nft = self._ctx()
        nft.set_terse_output(True)
        try:
            rc, out, err = self._try([{"list": {"table": {"family": _fam(family), "name": table}}}])
        finally:
            nft.set_terse_output(False)
        if rc != 0:
            if _missing(err):
                return _Current(())
            raise KernelError(f"nftables list table {_fam(family)} {table}: {_first_error(err)}")
        return _Current(out.get("nftables", []) if isinstance(out, dict) else ())

    # --- rulesets ----------------------------------------------------------------------

    def _table_commands(self, t: Table) -> tuple[list[Json], list[str]]:
        """The batch that makes table ``t`` hold what it lists, and a description of each change."""
        fam, name = _fam(t.family), t.name
        cur = self._list_table(t.family, name)
        cmds: list[Json] = []
        why: list[str] = []
        if not cur.exists:
            cmds.append({"add": {"table": {"family": fam, "name": name}}})
            why.append(f"table {fam} {name} missing")
        for s in t.sets:
            for spec in _set_specs(t.family, name, s):
                if spec["name"] not in cur.sets:
                    cmds.append({"add": {"set": spec}})
                    why.append(f"set {fam} {name} {spec['name']} missing")
        late: list[Json] = []
        # Every chain exists before any rule jumps to it: chains first, rules after.
        rules: list[Json] = []
        for chain in t.chains:
            if chain.name in NOT_IN_LAYOUT:
                continue
            have = cur.chains.get(chain.name)
            spec = _chain_spec(t.family, name, chain)
            where = f"chain {fam} {name} {chain.name}"
            if chain.kind == "absent":
                if have is not None:
                    late += [{"flush": {"chain": spec}}, {"delete": {"chain": spec}}]
                    why.append(f"{where} should not exist")
                continue
            if chain.kind == "reserved":
                if have is None:
                    cmds.append({"add": {"chain": spec}})
                    why.append(f"{where} missing")
                continue
            want = [e for r in chain.rules for e in render_rule(r, t.family)]
            add_rules = [{"add": {"rule": {"family": fam, "table": name, "chain": chain.name, "expr": e}}}
                         for e in want]
            if have is None:
                cmds.append({"add": {"chain": spec}})
                rules += add_rules
                why.append(f"{where} missing")
                continue
            rules_differ = cur.rules.get(chain.name, []) != want
            hook_differs = not _same_hook(have, chain)
            policy_differs = chain.hook is not None and have.get("policy") != chain.hook.policy
            if not (rules_differ or hook_differs or policy_differs):
                continue
            if hook_differs or chain.kind == "replaced":
                # A base chain cannot change its hook, and the DNS chains are
                # swapped whole: deleted and added again in this transaction.
                cmds += [{"delete": {"chain": spec}}, {"add": {"chain": spec}}]
                rules += add_rules
                why.append(f"{where} replaced")
                continue
            if policy_differs:
                cmds.append({"add": {"chain": spec}})  # updates the policy of a base chain
            if rules_differ:
                rules += [{"flush": {"chain": spec}}, *add_rules]
            why.append(f"{where} differs")
        return cmds + rules + late, why

    def ensure(self, ruleset: Ruleset) -> bool:
        if ruleset.netns is not None and ruleset.netns != self._netns:
            other = self._in(ruleset.netns)
            try:
                return other.ensure(ruleset)
            finally:
                other.close()
        # The generation check costs one netlink round trip; listing the
        # tables costs libnftables a fetch of every set element (7.8 ms with
        # 1000 VMs), so an unchanged ruleset is not listed again.
        if self._verified.holds(ruleset, _token(self._genid())):
            return False
        with file_lock(self._lock_path, self._lock_timeout, "nftables lock"):
            before = self._genid()
            cmds: list[Json] = []
            for t in ruleset.tables:
                cmds += self._table_commands(t)[0]
            if cmds:
                self._run(cmds, f"{ruleset.what} ruleset")
            after = self._genid()
        # Trusted only if nobody else committed while it was read and fixed.
        if after == before + (1 if cmds else 0):
            self._verified.put(ruleset, _token(after))
        if not cmds:
            return False
        log.debug("nftables: %s ruleset committed (%d commands)", ruleset.what, len(cmds))
        return True

    def drift(self, ruleset: Ruleset) -> list[str]:
        backend = self._in(ruleset.netns)
        try:
            return [w for t in ruleset.tables for w in backend._table_commands(t)[1]]
        finally:
            if backend is not self:
                backend.close()

    def describe(self, ruleset: Ruleset) -> list[str]:
        out = []
        for t in ruleset.tables:
            for s in t.sets:
                nets = f" (and {s}{NETS_SUFFIX} for networks)" if s in NETWORK_SETS else ""
                out.append(f"add set {_fam(t.family)} {t.name} {s}{nets}")
            for c in t.chains:
                if c.name not in NOT_IN_LAYOUT:
                    out += c.lines(t.family, t.name)
        return out

    # --- set elements ----------------------------------------------------------------------

    def _element_cmd(self, op: str, e: SetElement) -> Json:
        set_name = e.set if _is_host(e.network) else e.set + NETS_SUFFIX
        return {op: {"element": {"family": _fam(e.family), "table": TABLE, "name": set_name,
                                 "elem": [_element_value(e)]}}}

    # Host elements (a hotplug event's) go through netfilter netlink: one
    # key, one request. Networks live in the interval companions, whose
    # element changes libnftables has to merge; they keep its path.

    def _host_element(self, op: str, e: SetElement) -> bool:
        key = nft_key(str(ip_network(e.network).network_address), e.dev)
        nfnl = self._netlink()
        try:
            if op == "get":
                return nfnl.nft_element("get", e.family, TABLE, e.set, key)
            before = nfnl.nft_genid()
            changed = nfnl.nft_element(op, e.family, TABLE, e.set, key)
            if changed and nfnl.nft_genid() == before + 1:
                # Only this element moved the generation: what was complete still is.
                self._verified.advance(_token(before), _token(before + 1))
            return changed
        except OSError as exc:
            what = {"get": "look up", "add": "add", "del": "remove"}[op]
            raise KernelError(f"cannot {what} {e}: {exc.strerror}") from exc

    def add_element(self, e: SetElement) -> bool:
        if _is_host(e.network):
            return self._host_element("add", e)
        if self.element_present(e):
            return False
        rc, _, err = self._try([self._element_cmd("create", e)])
        if rc == 0:
            return True
        if "File exists" in err:
            return False
        raise KernelError(f"cannot add {e}: {_first_error(err)}")

    def remove_element(self, e: SetElement) -> bool:
        if _is_host(e.network):
            return self._host_element("del", e)
        # A failing libnftables command costs ~8 ms (it fetches its whole
        # cache to explain the error): look first.
        if not self.element_present(e):
            return False
        rc, _, err = self._try([self._element_cmd("delete", e)])
        if rc == 0:
            return True
        if _missing(err):
            return False
        raise KernelError(f"cannot remove {e}: {_first_error(err)}")

    def element_present(self, e: SetElement) -> bool:
        if _is_host(e.network):
            return self._host_element("get", e)
        # libnftables 1.0.6 has no JSON "get element"; the text command takes
        # values validated long before (interface names, addresses).
        net = ip_network(e.network)
        member = f'"{e.dev}" . {net}' if e.dev is not None else str(net)
        with thread_netns(self._netns):
            rc, _, err = self._ctx().cmd(f"get element {_fam(e.family)} {TABLE} {e.set}{NETS_SUFFIX} {{ {member} }}")
        if rc == 0:
            return True
        if _missing(err):
            return False
        raise KernelError(f"cannot look up {e}: {_first_error(err)}")

    def elements(self, family: Family, set_name: SetName, dev: str | None = None) -> list[SetElement]:
        """Every element (naming ``dev``), over netfilter netlink (:mod:`.set_dump`): one dump per physical set."""
        out: list[SetElement] = []
        nfnl = self._netlink()
        for physical in (set_name, set_name + NETS_SUFFIX) if set_name in NETWORK_SETS else (set_name,):
            try:
                with thread_netns(self._netns):
                    members = nft_members(nfnl, family, TABLE, physical, with_ifname=set_name == "allowed",
                                          dev=dev)
            except OSError as exc:
                raise KernelError(f"cannot list set {_fam(family)} {TABLE} {physical}: {exc.strerror}") from exc
            out += [SetElement(family, set_name, net, dev) for net, dev in members]
        return out

    # --- flow offload ----------------------------------------------------------------------

    def _dry_run(self, text: str) -> tuple[int, str]:
        """``text`` sent to the kernel in a batch that is never committed (libnftables' dry run).

        The Python binding has no dry-run switch; libnftables has
        ``nft_ctx_set_dry_run`` (libnftables(3)), reached here on a context of
        its own, opened in this backend's namespace.
        """
        import ctypes

        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error", "nft_ctx_free"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        with thread_netns(self._netns):
            ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise KernelError("cannot load libnftables for the flowtable probe")
        try:
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            lib.nft_ctx_set_dry_run(ctx, True)
            with thread_netns(self._netns):
                rc = int(lib.nft_run_cmd_from_buffer(ctx, text.encode()))
            err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        finally:
            lib.nft_ctx_free(ctx)
        return rc, err

    def flow_offload_missing(self) -> str | None:
        """Why this kernel cannot offload flows (``None``: it can). Changes nothing.

        The probe is the flowtable of current Qubes and its ``flow add`` rule
        in a throw-away table, in a batch that is never committed. A kernel
        that has them as modules may load them (``nf-flowtable-1``,
        ``nft-expr-flow_offload``), as installing them would.
        """
        rc, err = self._dry_run(_PROBE.format(t=PROBE_TABLE))
        if rc == 0:
            return None
        return (f"the kernel refused a flowtable ({_first_error(err)}): it needs CONFIG_NF_FLOW_TABLE, "
                "CONFIG_NF_FLOW_TABLE_INET and CONFIG_NFT_FLOW_OFFLOAD")

    def _list_accel(self, table: str) -> list[Json] | None:
        nft = self._ctx()
        nft.set_terse_output(True)
        try:
            rc, out, err = self._try([{"list": {"table": {"family": "inet", "name": table}}}])
        finally:
            nft.set_terse_output(False)
        if rc != 0:
            if _missing(err):
                return None
            raise KernelError(f"nftables list table inet {table}: {_first_error(err)}")
        return list(out.get("nftables", [])) if isinstance(out, dict) else []

    def ensure_offload(self, f: FlowOffload) -> bool:
        """Make the kernel hold ``f``: whole when anything but devices differs, else the devices it lacks added."""
        if f.netns is not None and f.netns != self._netns:
            other = self._in(f.netns)
            try:
                return other.ensure_offload(f)
            finally:
                other.close()
        with file_lock(self._lock_path, self._lock_timeout, "nftables lock"):
            differs = _offload_drift(f, self._list_accel(f.table))
            if not differs:
                return False
            if all(" lacks " in d for d in differs):
                self._run([{"add": {"flowtable": {"family": "inet", "table": f.table, "name": f.flowtable,
                                                  "hook": "ingress", "prio": f.ingress_priority,
                                                  "dev": list(f.devices)}}}], "flowtable devices")
            else:
                self._run(_offload_commands(f), f.what)
        log.debug("nftables: %s committed (%s)", f.what, "; ".join(differs))
        return True

    def offload_drift(self, f: FlowOffload) -> list[str]:
        backend = self._in(f.netns)
        try:
            return _offload_drift(f, backend._list_accel(f.table))
        finally:
            if backend is not self:
                backend.close()

    def _flowtable_cmd(self, op: str, d: FlowtableDevice) -> str:
        # Text, as for interval elements: the JSON parser of libnftables 1.0.6 takes no device
        # list on "delete flowtable". The name is an interface name validated long before.
        return (f"{op} flowtable inet {d.table} {d.flowtable} "
                f'{{ hook ingress priority 0; devices = {{ "{d.dev}" }}; }}')

    def add_flow_device(self, d: FlowtableDevice) -> bool:
        """Hook ``d.dev`` into the flowtable: one device, whatever the flowtable holds already
        (the kernel skips a device it has). ``False`` when the flowtable is gone (logged)."""
        with thread_netns(self._netns):
            rc, _, err = self._ctx().cmd(self._flowtable_cmd("add", d))
        if rc == 0:
            return True
        if _missing(err):
            log.warning("%s: flowtable inet %s %s is gone: its flows are not offloaded", d.dev, d.table, d.flowtable)
            return False
        raise KernelError(f"cannot add {d}: {_first_error(err)}")

    def remove_flow_device(self, d: FlowtableDevice) -> bool:
        with thread_netns(self._netns):
            rc, _, err = self._ctx().cmd(self._flowtable_cmd("delete", d))
        if rc == 0:
            return True
        if _missing(err):
            return False  # not among its devices, or no flowtable
        raise KernelError(f"cannot remove {d}: {_first_error(err)}")

    def flow_device_present(self, d: FlowtableDevice) -> bool:
        items = self._list_accel(d.table) or []
        return any(d.dev in _devices(i["flowtable"]) for i in items
                   if "flowtable" in i and i["flowtable"].get("name") == d.flowtable)

    # --- ownership ------------------------------------------------------------------------

    def owns_state(self) -> bool:
        families: tuple[Family, ...] = (4, 6)
        for family in families:
            cur = self._list_table(family, TABLE)
            if set(cur.chains) & set(OWNED_CHAINS) or cur.sets & set(SET_NAMES):
                return True
        return self._list_accel(ACCEL_TABLE) is not None

    def remove_all(self) -> bool:
        """Delete our chains and sets from ``qubes``; the table goes only when nothing else is left."""
        changed = False
        self._verified.clear()
        with file_lock(self._lock_path, self._lock_timeout, "nftables lock"):
            for family in (4, 6):
                fam: Family = 4 if family == 4 else 6
                cur = self._list_table(fam, TABLE)
                if not cur.exists:
                    continue
                ours = [c for c in cur.chains if c in OWNED_CHAINS]
                sets = [s for s in cur.sets if s.removesuffix(NETS_SUFFIX) in SET_NAMES]
                spec = {"family": _fam(fam), "table": TABLE}
                # Base chains first (they reference the others), then the rest, then sets.
                ordered = sorted(ours, key=lambda c: "hook" not in cur.chains[c])
                cmds: list[Json] = [{"flush": {"chain": dict(spec, name=c)}} for c in ordered]
                cmds += [{"delete": {"chain": dict(spec, name=c)}} for c in ordered]
                cmds += [{"delete": {"set": dict(spec, name=s)}} for s in sets]
                if not set(cur.chains) - set(ours):
                    cmds = [{"delete": {"table": {"family": _fam(fam), "name": TABLE}}}]
                if cmds:
                    self._run(cmds, f"removing {_fam(fam)} {TABLE}")
                    changed = True
            if self._list_accel(ACCEL_TABLE) is not None:
                self._run([{"delete": {"table": {"family": "inet", "name": ACCEL_TABLE}}}],
                          f"removing inet {ACCEL_TABLE}")
                changed = True
        return changed


def _parse_element(family: Family, set_name: SetName, value: Any) -> SetElement:
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"].get("val", value["elem"])

    def net(v: Any) -> str:
        if isinstance(v, dict) and "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        return str(ip_network(str(v)))

    if isinstance(value, dict) and "concat" in value:
        dev, addr = value["concat"]
        return SetElement(family, set_name, net(addr), str(dev))
    return SetElement(family, set_name, net(value))


def _missing(err: str) -> bool:
    return "No such file or directory" in err or "does not exist" in err


def _first_error(err: str) -> str:
    for line in err.splitlines():
        if "Error:" in line:
            return line.split("Error:", 1)[1].strip()
    return err.strip().splitlines()[0] if err.strip() else "failed"
