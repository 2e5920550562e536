"""The interface every firewall backend implements, and how ``auto`` picks one.

A backend renders the backend-neutral intent of :mod:`vif_hotplug.core.firewall`
(rulesets and set elements) into its own kernel objects. Both keep every
change atomic: one nftables transaction, or one commit per xtables table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Literal, Protocol

from ..core.errors import InvalidInput
from ..core.firewall import Family, FlowOffload, FlowtableDevice, Ruleset, SetElement, SetName

BackendName = Literal["nftables", "iptables"]
BACKEND_CHOICES = ("auto", "nftables", "iptables")
#: Exists while the kernel has legacy xtables (``ip_tables`` built in or loaded).
LEGACY_XTABLES = "/proc/net/ip_tables_names"


class FirewallBackend(Protocol):
    @property
    def name(self) -> BackendName: ...

    def ensure(self, ruleset: Ruleset) -> bool:
        """Make the firewall hold ``ruleset``; whether anything changed. Idempotent.

        One transaction (nftables) or one commit per table (iptables), under
        the backend's lock, nothing committed when nothing differs. Chains and
        rules outside the ruleset are left alone. Raises ``KernelError``.
        """
        ...

    def drift(self, ruleset: Ruleset) -> list[str]:
        """What in the kernel differs from ``ruleset`` (empty when in place). Changes nothing."""
        ...

    def add_element(self, element: SetElement) -> bool: ...

    def remove_element(self, element: SetElement) -> bool: ...

    def element_present(self, element: SetElement) -> bool: ...

    def elements(self, family: Family, set_name: SetName, dev: str | None = None) -> list[SetElement]:
        """Every element of a set, or only those naming interface ``dev`` (a listing of the set: the
        kernel's dump grows with the VMs, the decoding only with ``dev``'s elements)."""
        ...

    def describe(self, ruleset: Ruleset) -> list[str]:
        """``ruleset`` in this backend's own syntax, for ``-v`` and ``--dry-run``."""
        ...

    def flow_offload_missing(self) -> str | None:
        """Why flows cannot be offloaded here (``None``: they can). Changes nothing."""
        ...

    def ensure_offload(self, offload: FlowOffload) -> bool:
        """Make the kernel hold ``offload`` (its devices at least); whether anything changed."""
        ...

    def offload_drift(self, offload: FlowOffload) -> list[str]: ...

    def add_flow_device(self, device: FlowtableDevice) -> bool: ...

    def remove_flow_device(self, device: FlowtableDevice) -> bool: ...

    def flow_device_present(self, device: FlowtableDevice) -> bool: ...

    def owns_state(self) -> bool:
        """Whether this package's tables, chains or sets exist in this backend."""
        ...

    def remove_all(self) -> bool:
        """Remove what this package owns here (chains, jumps, sets), never the
        administrator's reserved chains or anyone else's rules."""
        ...

    def close(self) -> None: ...


def iptables_flavour(path_env: str | None = None) -> str | None:
    """``nf_tables``, ``legacy`` or ``None`` (no ``iptables`` command) for the host's ``iptables``.

    Debian and others install it as a symlink chain ending in
    ``xtables-nft-multi`` or ``xtables-legacy-multi``: reading the links
    costs no process. Anything else is asked with ``iptables -V``.
    """
    found = shutil.which("iptables", path=path_env or "/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        return None
    target = os.path.basename(os.path.realpath(found))
    if "nft" in target:
        return "nf_tables"
    if "legacy" in target:
        return "legacy"
    try:
        out = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "nf_tables" if "nf_tables" in out else "legacy"


def choose_backend(choice: str, path_env: str | None = None) -> BackendName:
    """``auto`` follows the host's ``iptables`` command.

    The nf_tables flavour, no ``iptables`` at all (current Qubes), or a
    kernel without legacy xtables means nftables; the legacy flavour means
    python-iptables.
    """
    if choice == "nftables":
        return "nftables"
    if choice == "iptables":
        return "iptables"
    if choice != "auto":
        raise InvalidInput(f"invalid firewall backend {choice!r}: expected auto, nftables or iptables")
    if iptables_flavour(path_env) == "legacy" and os.path.exists(LEGACY_XTABLES):
        return "iptables"
    return "nftables"


def open_backend(
    name: BackendName, xtables_lock: str, firewall_lock: str, lock_timeout: float, verified_path: str | None = None,
) -> FirewallBackend:
    """A closed backend object; it opens its library and sockets on first use.

    ``verified_path`` keeps the rulesets found complete across processes
    (:mod:`vif_hotplug.kernel.verified`).
    """
    if name == "iptables":
        from .iptables_backend import IptablesBackend

        return IptablesBackend(xtables_lock, lock_timeout, verified_path=verified_path)
    from .nftables_backend import NftablesBackend

    return NftablesBackend(firewall_lock, lock_timeout, verified_path=verified_path)
