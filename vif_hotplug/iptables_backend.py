"""Firewall backend on legacy xtables through python-iptables (``iptc``).

Facts this module is built around:

* ``iptc`` commits a whole table in one ``setsockopt``: a reader sees the old
  table or the new one, never a half-written chain.
* Commits from several processes lose each other's rules unless they are
  serialised: every read-modify-commit here holds ``flock`` on the xtables
  lock file (``XTABLES_LOCKFILE``, default ``/run/xtables.lock``, the same
  lock ``iptables -w`` takes) and refreshes the table after taking it.
* ``import iptc`` runs ``ldconfig`` to find the extensions unless
  ``XTABLES_LIBDIR`` is set; we set it when we can find the directory, which
  removes most of the import cost from the hotplug path.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any

from .errors import KernelError
from .firewall import ChainSpec, Family, Firewall, Hook, Policy, Rule, Ruleset
from .locks import file_lock

log = logging.getLogger(__name__)

DEFAULT_LOCKFILE = "/run/xtables.lock"
LOCK_TIMEOUT = 10.0

_LIBDIR_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/xtables",
    "/usr/lib/*/xtables",
    "/usr/lib64/xtables",
    "/usr/lib/xtables",
)

def load_iptc() -> ModuleType:
    """Import ``iptc`` on first use (it is slow and not needed by every command)."""
    if "XTABLES_LIBDIR" not in os.environ:
        for pattern in _LIBDIR_CANDIDATES:
            found = sorted(glob.glob(pattern))
            if found:
                os.environ["XTABLES_LIBDIR"] = found[0]
                break
    # setuptools' .pth hook serves "distutils" from setuptools, which costs
    # ~80 ms of imports on Python 3.11; iptc.util only wants get_python_lib
    # from it, which the standard library's distutils (or, where there is
    # none, iptc's own sysconfig fallback) answers as well. Hide the hook for
    # this one import.
    hooks = [f for f in sys.meta_path if type(f).__module__ == "_distutils_hack"]
    for finder in hooks:
        sys.meta_path.remove(finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import iptc
            import iptc.easy  # registers the dict helpers
    except Exception as exc:  # ImportError, or XTablesError from its ldconfig probe
        raise KernelError(f"cannot load python-iptables: {exc}") from exc
    finally:
        sys.meta_path[:0] = hooks
    return iptc  # type: ignore[no-any-return]


def xtables_lock(timeout: float = LOCK_TIMEOUT) -> AbstractContextManager[None]:
    """Hold the lock ``iptables -w`` uses, waiting up to ``timeout`` seconds."""
    return file_lock(os.environ.get("XTABLES_LOCKFILE", DEFAULT_LOCKFILE), timeout, "xtables lock")


_ADDR_OPTS = {"-s": "src", "-d": "dst", "-i": "in-interface", "-o": "out-interface", "-p": "protocol"}


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    """Translate iptables-save syntax into python-iptables' dict form.

    Supports what our planners emit: ``[!] -s/-d/-i/-o/-p X``, ``-m NAME
    [!] --opt V...`` and ``-j TARGET [--opt V...]``. Matches must be named
    explicitly (``-p udp -m udp --dport 53``).
    """
    tokens = list(rule.tokens)
    out: dict[str, Any] = {}
    section: dict[str, Any] | None = None
    target_name: str | None = None
    target_opts: dict[str, Any] = {}
    i = 0
    negate = False
    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in _ADDR_OPTS:
            out[_ADDR_OPTS[tok]] = ("!" if negate else "") + tokens[i + 1]
            i += 2
        elif tok == "-m":
            section = out.setdefault(tokens[i + 1], {})
            i += 2
        elif tok == "-j":
            target_name = tokens[i + 1]
            section = target_opts
            i += 2
        elif tok.startswith("--") and section is not None:
            values: list[str] = []
            i += 1
            while i < len(tokens) and not tokens[i].startswith("-") and tokens[i] != "!":
                values.append(tokens[i])
                i += 1
            value: Any
            if negate:
                value = ["!", *values]
            elif len(values) == 1:
                value = values[0]
            else:
                value = values
            section[tok[2:]] = value
        else:
            raise ValueError(f"unsupported token {tok!r} in rule {rule.text!r}")
        negate = False
    if target_name is None:
        raise ValueError(f"rule without target: {rule.text!r}")
    out["target"] = {target_name: target_opts} if target_opts else target_name
    return out


class IptablesFirewall:
    """:class:`~vif_hotplug.firewall.Firewall` on legacy xtables via ``iptc``."""

    def __init__(self, lock_timeout: float = LOCK_TIMEOUT) -> None:
        self._lock_timeout = lock_timeout

    def _table(self, family: Family, name: str) -> Any:
        iptc = load_iptc()
        table = iptc.Table6(name) if family == 6 else iptc.Table(name)
        table.autocommit = False
        table.refresh()
        return table

    def _encode(self, family: Family, rule: Rule) -> Any:
        iptc = load_iptc()
        try:
            encoded = iptc.easy.encode_iptc_rule(rule_to_dict(rule), ipv6=family == 6)
            # Targets such as MASQUERADE fill in defaults only in final_check
            # (called at commit); without it a rule read back from the kernel
            # never equals the one we build, and every sync would commit.
            encoded.final_check()
            return encoded
        except Exception as exc:
            raise KernelError(f"iptables rejects rule {rule.text!r}: {exc}") from exc

    @staticmethod
    def _place_hook(chain: Any, rule: Any, hook: Hook) -> bool:
        """Make ``rule`` appear once, at ``hook.position``; ``True`` if the chain changed.

        A jump that something else pushed down would let the rules above it
        bypass ours (an ACCEPT above the anti-spoofing jump): it moves back.
        """
        rules = chain.rules
        target = min(hook.position - 1, len(rules))
        found = [i for i, r in enumerate(rules) if r == rule]
        if found == [target]:
            return False
        for i in reversed(found):
            chain.delete_rule(rules[i])
        chain.insert_rule(rule, position=min(target, len(chain.rules)))
        return True

    def sync(self, ruleset: Ruleset) -> bool:
        tables: dict[tuple[Family, str], tuple[list[ChainSpec], list[Hook], list[Policy]]] = {}
        for c in ruleset.chains:
            tables.setdefault((c.family, c.table), ([], [], []))[0].append(c)
        for h in ruleset.hooks:
            tables.setdefault((h.family, h.table), ([], [], []))[1].append(h)
        for p in ruleset.policies:
            tables.setdefault((p.family, p.table), ([], [], []))[2].append(p)
        changed = False
        with xtables_lock(self._lock_timeout):
            for (family, name), (chains, hooks, policies) in sorted(tables.items()):
                changed |= self._sync_table(family, name, chains, hooks, policies)
        return changed

    def _sync_table(
        self, family: Family, name: str, chains: list[ChainSpec], hooks: list[Hook], policies: list[Policy]
    ) -> bool:
        iptc = load_iptc()
        try:
            table = self._table(family, name)
            changed = False
            for spec in chains:
                if not table.is_chain(spec.name):
                    table.create_chain(spec.name)
                    changed = True
                if not spec.owned:
                    continue
                chain = iptc.Chain(table, spec.name)
                want = [self._encode(family, r) for r in spec.rules]
                have = chain.rules
                if len(have) != len(want) or any(h != w for h, w in zip(have, want, strict=False)):
                    chain.flush()
                    for r in want:
                        chain.append_rule(r)
                    changed = True
            for hook in sorted(hooks, key=lambda h: h.position):
                changed |= self._place_hook(iptc.Chain(table, hook.chain), self._encode(family, hook.rule), hook)
            for pol in policies:
                chain = iptc.Chain(table, pol.chain)
                if chain.get_policy().name != pol.target:
                    chain.set_policy(pol.target)
                    changed = True
            if changed:
                table.commit()
                log.info("committed %s table %s", "ip6" if family == 6 else "ip", name)
            else:
                # Drop the handle's pending state so the next refresh is clean.
                table.refresh()
            return changed
        except iptc.IPTCError as exc:
            raise KernelError(f"{'ip6tables' if family == 6 else 'iptables'} {name}: {exc}") from exc


def split_by_family(ruleset: Ruleset) -> dict[int, Ruleset]:
    """The IPv4 and IPv6 parts of ``ruleset`` (families with nothing are left out). Pure."""
    out: dict[int, Ruleset] = {}
    for fam in sorted({c.family for c in ruleset.chains} | {h.family for h in ruleset.hooks}
                      | {p.family for p in ruleset.policies}):
        out[fam] = Ruleset(
            chains=tuple(c for c in ruleset.chains if c.family == fam),
            hooks=tuple(h for h in ruleset.hooks if h.family == fam),
            policies=tuple(p for p in ruleset.policies if p.family == fam),
        )
    return out


class FamilyIsolatedFirewall:
    """A :class:`Firewall` that syncs each address family in its own child process.

    libxtables registers a multi-family extension (``MASQUERADE``,
    ``TPROXY``...) for the first family that loads it; python-iptables then
    cannot build the same target for the other family in that process
    ("invalid rule"; python-iptables issues #316, #325). A forked child per
    family starts from a clean libxtables. Each table is still committed
    once and atomically, as before: a family's tables never shared a commit.
    """

    def __init__(self, make: Callable[[], Firewall]) -> None:
        self._make = make

    def sync(self, ruleset: Ruleset) -> bool:
        changed = False
        for part in split_by_family(ruleset).values():
            changed |= self._sync_in_child(part)
        return changed

    def _sync_in_child(self, ruleset: Ruleset) -> bool:
        from .forked import call_in_child

        return call_in_child(lambda: self._make().sync(ruleset), what="firewall")
