"""The XenStore wire protocol (``xen/include/public/io/xs_wire.h``), without I/O.

A message is a 16-byte header of four little-endian ``uint32`` (type, req_id,
tx_id, len) followed by ``len`` payload bytes, ``len`` at most
:data:`XENSTORE_PAYLOAD_MAX`. Arguments inside a payload are NUL-terminated
strings; errors travel as an ``XS_ERROR`` message whose payload is an errno
name such as ``b"ENOENT\\0"``. Semantics follow ``docs/misc/xenstore.txt``.
"""

from __future__ import annotations

import enum
import errno
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

XENSTORE_PAYLOAD_MAX: Final = 4096
XENSTORE_ABS_PATH_MAX: Final = 3072
XENSTORE_REL_PATH_MAX: Final = 2048
DOMAIN_PATH_PREFIX: Final = "/local/domain/"

HEADER: Final = struct.Struct("<IIII")
HEADER_SIZE: Final = HEADER.size
_UINT32_MAX: Final = 0xFFFFFFFF
_DOMID_MAX: Final = 0xFFFF


class Op(enum.IntEnum):
    """Message types (``enum xsd_sockmsg_type``); 20 was XS_RESTRICT, now unused."""

    CONTROL = 0
    DEBUG = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21
    DIRECTORY_PART = 22


#: The errno names xenstored may put in an ``XS_ERROR`` payload.
XS_ERRORS: Final[tuple[str, ...]] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOSPC", "EIO", "ENOTEMPTY",
    "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)

SPECIAL_WATCH_PATHS: Final = frozenset({"@introduceDomain", "@releaseDomain"})


class WireError(ValueError):
    """Bytes or strings that do not follow the protocol."""


class PayloadTooLarge(WireError):
    """A payload over :data:`XENSTORE_PAYLOAD_MAX`; ``header`` is set when decoding."""

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


class MalformedPayload(WireError):
    """Payload arguments missing, extra, or not NUL-terminated."""


class InvalidPath(WireError):
    """A node path the daemon must refuse with ``EINVAL``."""


class InvalidPermission(WireError):
    """A permission string that is not ``[nrwb]<domid>``."""


class XenStoreError(Exception):
    """A request failed with one of :data:`XS_ERRORS` (``name``, e.g. ``"ENOENT"``)."""

    def __init__(self, name: str) -> None:
        if name not in XS_ERRORS:
            raise ValueError(f"{name!r} is not a XenStore error name")
        super().__init__(name)
        self.name = name

    @property
    def errno(self) -> int:
        return int(getattr(errno, self.name))

    @property
    def payload(self) -> bytes:
        return error_payload(self.name)


def error_payload(name: str) -> bytes:
    """The ``XS_ERROR`` payload for ``name``: the name and a NUL."""
    if name not in XS_ERRORS:
        raise ValueError(f"{name!r} is not a XenStore error name")
    return name.encode() + b"\0"


def parse_error_payload(payload: bytes) -> str:
    """The errno name in an ``XS_ERROR`` payload; :exc:`MalformedPayload` if it is not one."""
    name = payload.rstrip(b"\0").decode("ascii", "replace")
    if name not in XS_ERRORS:
        raise MalformedPayload(f"unknown error payload {payload!r}")
    return name


def _check_uint32(name: str, value: int) -> None:
    if not 0 <= value <= _UINT32_MAX:
        raise WireError(f"{name}={value} does not fit in uint32")


@dataclass(frozen=True, slots=True)
class Header:
    """``struct xsd_sockmsg``; ``type`` is a plain int so unknown types still decode."""

    type: int
    req_id: int
    tx_id: int
    length: int

    def __post_init__(self) -> None:
        for name in ("type", "req_id", "tx_id", "length"):
            _check_uint32(name, getattr(self, name))

    def pack(self) -> bytes:
        return HEADER.pack(self.type, self.req_id, self.tx_id, self.length)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Decode exactly :data:`HEADER_SIZE` bytes."""
        if len(data) != HEADER_SIZE:
            raise WireError(f"header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*HEADER.unpack(data))


@dataclass(frozen=True, slots=True)
class Message:
    """One complete message. ``op`` is ``None`` for types this module does not know."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes = b""

    def __post_init__(self) -> None:
        for name in ("type", "req_id", "tx_id"):
            _check_uint32(name, getattr(self, name))

    @property
    def op(self) -> Op | None:
        try:
            return Op(self.type)
        except ValueError:
            return None

    @property
    def header(self) -> Header:
        return Header(self.type, self.req_id, self.tx_id, len(self.payload))


def encode(message: Message) -> bytes:
    """Header plus payload; :exc:`PayloadTooLarge` past :data:`XENSTORE_PAYLOAD_MAX`."""
    if len(message.payload) > XENSTORE_PAYLOAD_MAX:
        raise PayloadTooLarge(f"payload of {len(message.payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}")
    return message.header.pack() + message.payload


class Decoder:
    """Reassembles messages from a byte stream cut at arbitrary points.

    :meth:`feed` buffers bytes; iterating yields each complete message in
    order and stops at the first incomplete one. A header announcing more than
    ``max_payload`` bytes raises :exc:`PayloadTooLarge` (carrying that header)
    from the iteration, and again on every later attempt: the stream cannot be
    resynchronised, so the caller should drop the connection.
    """

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` until more bytes arrive."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        header = Header.unpack(bytes(self._buffer[:HEADER_SIZE]))
        if header.length > self._max_payload:
            raise PayloadTooLarge(f"announced payload of {header.length} bytes exceeds {self._max_payload}", header)
        end = HEADER_SIZE + header.length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        return Message(header.type, header.req_id, header.tx_id, payload)


def split_args(payload: bytes, count: int | None = None, *, at_least: int = 1) -> list[bytes]:
    """The NUL-terminated strings making up ``payload``.

    Every argument must end with a NUL. With ``count`` there must be exactly
    that many, otherwise at least ``at_least``; :exc:`MalformedPayload` if not.
    """
    if not payload.endswith(b"\0"):
        raise MalformedPayload("payload is not NUL-terminated")
    args = payload[:-1].split(b"\0")
    if count is not None and len(args) != count:
        raise MalformedPayload(f"expected {count} argument(s), got {len(args)}")
    if len(args) < at_least:
        raise MalformedPayload(f"expected at least {at_least} argument(s), got {len(args)}")
    return args


def join_args(*args: bytes) -> bytes:
    """Each argument followed by a NUL, the form of a request or reply payload."""
    return b"".join(arg + b"\0" for arg in args)


_PATH_CHARS = re.compile(r"[A-Za-z0-9/_@-]+")


def check_path(path: str) -> None:
    """Raise :exc:`InvalidPath` unless ``path`` is a valid node path.

    Absolute paths start with ``/`` and are limited to
    :data:`XENSTORE_ABS_PATH_MAX` bytes, relative ones to
    :data:`XENSTORE_REL_PATH_MAX`; only ``[A-Za-z0-9/_@-]`` is allowed; no
    ``//`` and no trailing ``/`` except for the root ``/`` itself.
    """
    if not path:
        raise InvalidPath("empty path")
    limit = XENSTORE_ABS_PATH_MAX if path.startswith("/") else XENSTORE_REL_PATH_MAX
    if len(path) > limit:
        raise InvalidPath(f"path longer than {limit} bytes")
    if not _PATH_CHARS.fullmatch(path):
        raise InvalidPath(f"invalid character in {path!r}")
    if "//" in path or (path.endswith("/") and path != "/"):
        raise InvalidPath(f"empty path component in {path!r}")


def is_valid_path(path: str) -> bool:
    try:
        check_path(path)
    except InvalidPath:
        return False
    return True


def decode_path(raw: bytes) -> str:
    """A path argument from the wire as ``str``; :exc:`InvalidPath` if it is not ASCII."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as exc:
        raise InvalidPath(f"non-ASCII path {raw!r}") from exc


def resolve_path(path: str, home: str) -> str:
    """The absolute form of a validated ``path``, relative ones joined to ``home``."""
    check_path(path)
    return path if path.startswith("/") else f"{home}/{path}"


def domain_path(domid: int) -> str:
    """A domain's home, which its relative paths resolve against."""
    return f"{DOMAIN_PATH_PREFIX}{domid}"


def parse_domid(raw: bytes) -> int:
    """A decimal domain id argument; :exc:`MalformedPayload` if it is not one."""
    if not raw.isdigit() or int(raw) > _DOMID_MAX:
        raise MalformedPayload(f"invalid domain id {raw!r}")
    return int(raw)


class PermKind(enum.Enum):
    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"


_PERM = re.compile(r"([nrwb])([0-9]+)")


@dataclass(frozen=True, slots=True)
class Permission:
    """One entry of a node's permission list, e.g. ``n0`` or ``r5``.

    The first entry of a list names the owner, whose ``kind`` is what every
    domain not listed afterwards gets.
    """

    kind: PermKind
    domid: int

    def __post_init__(self) -> None:
        if not 0 <= self.domid <= _DOMID_MAX:
            raise InvalidPermission(f"domain id {self.domid} out of range")

    @classmethod
    def parse(cls, text: str) -> Permission:
        match = _PERM.fullmatch(text)
        if match is None:
            raise InvalidPermission(f"invalid permission {text!r}")
        return cls(PermKind(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.kind.value}{self.domid}"


def parse_perms(args: list[bytes]) -> tuple[Permission, ...]:
    """A non-empty permission list from its wire arguments."""
    if not args:
        raise InvalidPermission("empty permission list")
    try:
        return tuple(Permission.parse(arg.decode("ascii")) for arg in args)
    except UnicodeDecodeError as exc:
        raise InvalidPermission("non-ASCII permission") from exc


DEFAULT_PERMS: Final = (Permission(PermKind.NONE, 0),)
