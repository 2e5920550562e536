"""Frozen value classes that cost nothing to define.

Why not ``dataclasses``: it writes and compiles every class's ``__init__``,
``__eq__``, ``__hash__``, ``__repr__``, ``__setattr__`` and ``__delattr__``
when the class is defined; for the sixty-odd classes a hotplug event's
modules hold, that was about half of a one-shot process's start (measured
on this project's machine: 98 of 207 ms under cProfile). A :class:`Record`
subclass gets the same behaviour from shared methods instead: fields from
its annotations (in order), defaults from class attributes, ``__post_init__``
called when defined, frozen, equal
when of the same class with equal fields, hashable, a dataclass-like repr.
``typing.dataclass_transform`` tells type checkers as much.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, ClassVar, TypeVar, dataclass_transform

R = TypeVar("R", bound="Record")


@dataclass_transform(frozen_default=True)
class Record:
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _values: ClassVar[Any] = None

    def __init_subclass__(cls, order: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The class's own annotations, as written (inspect.get_annotations would cost an import of inspect).
        own = [name for name, kind in cls.__dict__.get("__annotations__", {}).items()  # noqa: RUF063
               if not str(kind).startswith(("ClassVar", "typing.ClassVar"))]
        cls._fields = tuple(dict.fromkeys([*cls._fields, *own]))
        cls._defaults = {name: getattr(cls, name) for name in cls._fields if hasattr(cls, name)}
        # A tuple of the values in field order, for hashing and repr.
        cls._values = staticmethod(itemgetter(*cls._fields) if len(cls._fields) > 1 else _values_of(cls._fields))
        if order:  # compared as the tuples of their fields, as dataclasses' order=True
            cls.__lt__ = lambda a, b: _key(a, b) < _key(b, a)  # type: ignore[operator]
            cls.__le__ = lambda a, b: _key(a, b) <= _key(b, a)  # type: ignore[operator]
            cls.__gt__ = lambda a, b: _key(a, b) > _key(b, a)  # type: ignore[operator]
            cls.__ge__ = lambda a, b: _key(a, b) >= _key(b, a)  # type: ignore[operator]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        names = cls._fields
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__}() takes {len(names)} arguments, {len(args)} given")
        values = self.__dict__
        values.update(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"{cls.__name__}() got an unexpected or repeated argument {key!r}")
            values[key] = value
        if len(values) < len(names):
            for name in names:
                if name not in values:
                    try:
                        values[name] = cls._defaults[name]
                    except KeyError:
                        raise TypeError(f"{cls.__name__}() missing argument {name!r}") from None
        check = getattr(self, "__post_init__", None)
        if check is not None:
            check()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of frozen {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(self._values(self.__dict__))

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={self.__dict__[name]!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"


def _values_of(names: tuple[str, ...]) -> Any:
    """The values of ``names`` (none or one: ``itemgetter`` would not give a tuple) as a tuple."""
    return lambda d: tuple(d[f] for f in names)


def _key(record: Record, other: object) -> tuple[Any, ...]:
    if other.__class__ is not record.__class__:
        raise TypeError(f"cannot order {type(record).__name__} against {type(other).__name__}")
    return tuple(record.__dict__[name] for name in record._fields)


def replace(obj: R, **changes: Any) -> R:
    """A copy of ``obj`` with ``changes`` (as ``dataclasses.replace``)."""
    return type(obj)(**{**{name: obj.__dict__[name] for name in obj._fields}, **changes})
