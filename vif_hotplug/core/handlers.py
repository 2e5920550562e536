"""How the one applier reaches the system: a table of handlers per kind of kernel object.

Pure types, no I/O. The kernel host (:mod:`vif_hotplug.kernel.host`) fills
the table with its adapters, unit tests with fakes; the applier
(:mod:`vif_hotplug.app.applier`) owns what the operations mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from .model import Step

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ObjectOps(Generic[T]):
    """An object kind: ``add``/``remove`` say whether they changed anything."""

    add: Callable[[T], bool]
    remove: Callable[[T], bool]
    present: Callable[[T], bool]


@dataclass(frozen=True, slots=True)
class SettingOps(Generic[T]):
    """A setting kind: ``set`` returns the previous value when it changed, else ``None``;
    ``current`` the value the kernel has now (``None`` when the object is gone)."""

    set: Callable[[T], T | None]
    current: Callable[[T], T | None]


@dataclass(frozen=True, slots=True)
class EnsureOps(Generic[T]):
    """A ruleset kind: ``ensure`` says whether it changed anything; ``drift``
    lists what differs from the kernel (empty when in place)."""

    ensure: Callable[[T], bool]
    drift: Callable[[T], list[str]]


@dataclass(frozen=True, slots=True)
class ActionOps(Generic[T]):
    run: Callable[[T], None]


Ops = ObjectOps[Any] | SettingOps[Any] | EnsureOps[Any] | ActionOps[Any]
Handlers = Mapping[type, Ops]


class Host(Protocol):
    """What the applier needs from the system: the kernel adapters, or a fake."""

    @property
    def handlers(self) -> Handlers: ...


#: Called before (``"before"``) and after (``"after"``) each step with its
#: index: the documented fault-injection point of the reliability tests.
StepHook = Callable[[str, int, Step], None]
