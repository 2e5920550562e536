"""Rulesets a backend found complete, and the kernel state they were found in.

Checking a whole ruleset is the costly part of an event that changes only
set elements: libnftables lists every set element to list a chain, and
python-iptables decodes whole tables. A backend records here, per ruleset,
a token of the kernel state it verified (the nftables generation, a digest
of the xtables tables); while the kernel still shows that token, the
ruleset is still complete and is not read again. Anything else changing
the firewall changes the token, and the next event checks in full.

Kept in memory, and in a file of the state directory when given, so that
a one-shot process (the agent's fallback) starts from what the last one
verified: written when a ruleset is found complete, and when the backend
closes (the moves of an event's own element commits). A lost, stale or
unreadable file only costs one full check. The file is named after the
network namespace's cookie (:mod:`.state_files`): it can only ever vouch
for the namespace that wrote it. Safe for the agent's threads (one lock)
and bounded (:data:`MAX_RULESETS`, the least recently verified go first).
"""

from __future__ import annotations

import json
import threading
import zlib

from ..core.firewall import Ruleset
from .state_files import atomic_write

#: Rulesets remembered at most (a netvm has a handful: anti-spoofing, base, DNS, NAT namespaces').
MAX_RULESETS = 64


def ruleset_key(ruleset: Ruleset) -> str:
    """A name for ``ruleset`` that is the same in every process (``hash`` is salted per process).

    CRC-32 and length: the names only tell a handful of our own rulesets apart.
    """
    text = repr(ruleset).encode()
    return f"{zlib.crc32(text):08x}-{len(text)}"


class VerifiedRulesets:
    def __init__(self, path: str | None = None) -> None:
        self._path = path
        self._tokens: dict[str, str] | None = None
        self._keys: dict[Ruleset, str] = {}
        self._dirty = False
        # Agent threads share one backend, and so one record.
        self._lock = threading.RLock()

    def _key(self, ruleset: Ruleset) -> str:
        key = self._keys.get(ruleset)
        if key is None:
            if len(self._keys) >= MAX_RULESETS:
                self._keys.clear()
            key = self._keys[ruleset] = ruleset_key(ruleset)
        return key

    def _load(self) -> dict[str, str]:
        if self._tokens is None:
            self._tokens = {}
            if self._path is not None:
                try:
                    with open(self._path, encoding="utf-8") as f:
                        data = json.load(f)
                    if isinstance(data, dict):
                        self._tokens = {str(k): str(v) for k, v in list(data.items())[-MAX_RULESETS:]}
                except (OSError, ValueError):
                    pass
        return self._tokens

    def _save(self) -> None:
        self._dirty = False
        if self._path is None or self._tokens is None:
            return
        try:
            atomic_write(self._path, json.dumps(self._tokens))
        except OSError:
            pass  # only the next process's speed depends on it

    def holds(self, ruleset: Ruleset, token: str) -> bool:
        """Whether ``ruleset`` was found complete in the kernel state ``token`` names.

        On a miss the file is read again: another process (a fallback run
        beside the agent) may have verified or moved on since.
        """
        with self._lock:
            key = self._key(ruleset)
            if self._load().get(key) == token:
                return True
            if self._path is None:
                return False
            self._tokens = None
            self._dirty = False
            return self._load().get(key) == token

    def put(self, ruleset: Ruleset, token: str) -> None:
        with self._lock:
            tokens = self._load()
            key = self._key(ruleset)
            if tokens.get(key) != token:
                tokens.pop(key, None)  # re-inserted last: the most recently verified
                tokens[key] = token
                while len(tokens) > MAX_RULESETS:
                    del tokens[next(iter(tokens))]
                self._save()

    def advance(self, old: str, new: str) -> None:
        """The kernel moved from ``old`` to ``new`` by a change that leaves rulesets as they were.

        Kept in memory until :meth:`flush`: an event's element commits must
        not each cost a file write.
        """
        with self._lock:
            tokens = self._load()
            for k, v in tokens.items():
                if v == old:
                    tokens[k] = new
                    self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._save()

    def clear(self) -> None:
        with self._lock:
            self._tokens = {}
            self._save()
