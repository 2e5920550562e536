"""The ``connected`` sets: addresses of every VM that uses this netvm, running or not. Pure.

Qubes publishes them (QubesDB ``/connected-ips``, ``/connected-ips6``); a
switched-off VM's address must neither come in from the uplink nor be
routed out of it. Only the difference with what the sets hold is changed.
"""

from __future__ import annotations

from collections.abc import Iterable

from .firewall import Family, SetElement
from .model import Step
from .netvm_params import Connected


def connected_steps(
    connected: Connected, present: Iterable[SetElement], families: tuple[Family, ...]
) -> tuple[Step, ...]:
    """Steps that make the ``connected`` sets of ``families`` hold exactly ``connected``."""
    desired = {SetElement(4, "connected", f"{a}/32") for a in connected.ipv4}
    desired |= {SetElement(6, "connected", f"{a}/128") for a in connected.ipv6}
    desired = {e for e in desired if e.family in families}
    have = {e for e in present if e.family in families}
    return tuple(Step("add", e) for e in sorted(desired - have)) + tuple(
        Step("remove", e) for e in sorted(have - desired)
    )
