"""The XenStore wire format: framing, argument encoding, paths, permissions."""

from __future__ import annotations

import struct

import pytest

from vif_hotplug.xen.xs_wire import (
    HEADER_SIZE,
    XENSTORE_PAYLOAD_MAX,
    XS_ERRORS,
    Decoder,
    Header,
    InvalidPath,
    InvalidPermission,
    MalformedPayload,
    Message,
    Op,
    PayloadTooLarge,
    Permission,
    PermKind,
    XenStoreError,
    check_path,
    decode_path,
    domain_path,
    encode,
    error_payload,
    join_args,
    parse_domid,
    parse_error_payload,
    parse_perms,
    resolve_path,
    split_args,
)

HOME = "/local/domain/0"


def test_header_is_four_little_endian_uint32() -> None:
    assert Header(2, 7, 9, 5).pack() == struct.pack("<IIII", 2, 7, 9, 5)


def test_encode_puts_payload_length_in_header() -> None:
    data = encode(Message(Op.READ, 1, 0, b"/a\0"))
    assert Header.unpack(data[:HEADER_SIZE]) == Header(Op.READ, 1, 0, 3)
    assert data[HEADER_SIZE:] == b"/a\0"


def test_encode_then_decode_round_trips_a_message() -> None:
    message = Message(Op.WRITE, 0xFFFFFFFF, 42, b"/a/b\0value")
    decoder = Decoder()
    decoder.feed(encode(message))
    assert list(decoder) == [message]


def test_decoder_reassembles_a_message_fed_one_byte_at_a_time() -> None:
    message = Message(Op.DIRECTORY, 3, 0, b"/local\0")
    decoder = Decoder()
    received: list[Message] = []
    for byte in encode(message):
        decoder.feed(bytes([byte]))
        received.extend(decoder)
    assert received == [message]


def test_decoder_returns_every_message_completed_by_one_feed() -> None:
    messages = [Message(Op.READ, n, 0, f"/n{n}\0".encode()) for n in range(3)]
    decoder = Decoder()
    decoder.feed(b"".join(encode(m) for m in messages))
    assert list(decoder) == messages


def test_decoder_keeps_an_incomplete_message_buffered() -> None:
    data = encode(Message(Op.READ, 1, 0, b"/abc\0"))
    decoder = Decoder()
    decoder.feed(data[:-2])
    assert list(decoder) == []
    assert decoder.buffered == len(data) - 2


def test_decoder_decodes_an_empty_payload() -> None:
    decoder = Decoder()
    decoder.feed(encode(Message(Op.TRANSACTION_START, 1, 0)))
    assert list(decoder) == [Message(Op.TRANSACTION_START, 1, 0, b"")]


def test_decoder_reports_oversized_payload_with_its_header() -> None:
    decoder = Decoder()
    decoder.feed(Header(Op.WRITE, 5, 6, XENSTORE_PAYLOAD_MAX + 1).pack())
    with pytest.raises(PayloadTooLarge) as caught:
        list(decoder)
    assert caught.value.header == Header(Op.WRITE, 5, 6, XENSTORE_PAYLOAD_MAX + 1)


def test_decoder_yields_messages_preceding_an_oversized_header() -> None:
    good = Message(Op.READ, 1, 0, b"/a\0")
    decoder = Decoder()
    decoder.feed(encode(good) + Header(Op.READ, 2, 0, 1 << 20).pack())
    received: list[Message] = []
    with pytest.raises(PayloadTooLarge):
        for message in decoder:
            received.append(message)
    assert received == [good]


def test_unknown_message_type_decodes_with_op_none() -> None:
    decoder = Decoder()
    decoder.feed(encode(Message(99, 1, 0, b"x")))
    assert [m.op for m in decoder] == [None]


def test_encode_accepts_payload_at_the_limit() -> None:
    assert len(encode(Message(Op.WRITE, 1, 0, b"x" * XENSTORE_PAYLOAD_MAX))) == HEADER_SIZE + XENSTORE_PAYLOAD_MAX


def test_encode_rejects_payload_over_the_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        encode(Message(Op.WRITE, 1, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1)))


def test_message_rejects_ids_outside_uint32() -> None:
    with pytest.raises(ValueError):
        Message(Op.READ, 1 << 32, 0)


@pytest.mark.parametrize(
    ("op", "number"),
    [
        (Op.CONTROL, 0), (Op.DEBUG, 0), (Op.DIRECTORY, 1), (Op.READ, 2), (Op.GET_PERMS, 3), (Op.WATCH, 4),
        (Op.UNWATCH, 5), (Op.TRANSACTION_START, 6), (Op.TRANSACTION_END, 7), (Op.INTRODUCE, 8),
        (Op.RELEASE, 9), (Op.GET_DOMAIN_PATH, 10), (Op.WRITE, 11), (Op.MKDIR, 12), (Op.RM, 13),
        (Op.SET_PERMS, 14), (Op.WATCH_EVENT, 15), (Op.ERROR, 16), (Op.IS_DOMAIN_INTRODUCED, 17),
        (Op.RESUME, 18), (Op.SET_TARGET, 19), (Op.RESET_WATCHES, 21), (Op.DIRECTORY_PART, 22),
    ],
)
def test_op_number_matches_xs_wire_h(op: Op, number: int) -> None:
    assert op == number


@pytest.mark.parametrize("name", XS_ERRORS)
def test_error_payload_is_the_errno_name_and_a_nul(name: str) -> None:
    assert error_payload(name) == name.encode() + b"\0"


@pytest.mark.parametrize("name", XS_ERRORS)
def test_error_payload_parses_back_to_its_name(name: str) -> None:
    assert parse_error_payload(error_payload(name)) == name


def test_error_payload_rejects_a_name_outside_the_table() -> None:
    with pytest.raises(ValueError):
        error_payload("ENOMEDIUM")


def test_xenstore_error_maps_name_to_errno() -> None:
    assert XenStoreError("EAGAIN").errno == 11


@pytest.mark.parametrize(
    ("payload", "args"),
    [
        (b"/a\0", [b"/a"]),
        (b"/a\0tok\0", [b"/a", b"tok"]),
        (b"\0", [b""]),
    ],
)
def test_split_args_returns_nul_terminated_strings(payload: bytes, args: list[bytes]) -> None:
    assert split_args(payload) == args


@pytest.mark.parametrize(
    ("payload", "count"),
    [
        (b"/a", 1),
        (b"", 1),
        (b"/a\0b\0", 1),
        (b"/a\0", 2),
    ],
)
def test_split_args_rejects_malformed_payload(payload: bytes, count: int) -> None:
    with pytest.raises(MalformedPayload):
        split_args(payload, count)


def test_join_args_terminates_each_argument() -> None:
    assert join_args(b"/a", b"tok") == b"/a\0tok\0"


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/local/domain/0",
        "device/vif/0/state",
        "a",
        "/A-Z_a-z@0-9",
        "/" + "x" * 3071,
        "r" * 2048,
    ],
)
def test_valid_path_is_accepted(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/a/",
        "a/",
        "//",
        "/a//b",
        "/a b",
        "/a.b",
        "/a:b",
        "/é",
        "/a\0b",
        "/" + "x" * 3072,
        "r" * 2049,
    ],
)
def test_invalid_path_is_rejected(path: str) -> None:
    with pytest.raises(InvalidPath):
        check_path(path)


def test_non_ascii_path_bytes_are_rejected() -> None:
    with pytest.raises(InvalidPath):
        decode_path(b"/\xff")


def test_relative_path_resolves_against_home() -> None:
    assert resolve_path("device/vif", HOME) == "/local/domain/0/device/vif"


def test_absolute_path_resolves_to_itself() -> None:
    assert resolve_path("/vm/1", HOME) == "/vm/1"


def test_domain_path_is_under_local_domain() -> None:
    assert domain_path(7) == "/local/domain/7"


@pytest.mark.parametrize("raw", [b"", b"-1", b"x", b"65536", b" 1"])
def test_parse_domid_rejects_non_domain_ids(raw: bytes) -> None:
    with pytest.raises(MalformedPayload):
        parse_domid(raw)


@pytest.mark.parametrize(
    ("text", "perm"),
    [
        ("n0", Permission(PermKind.NONE, 0)),
        ("r1", Permission(PermKind.READ, 1)),
        ("w2", Permission(PermKind.WRITE, 2)),
        ("b3", Permission(PermKind.BOTH, 3)),
        ("b65535", Permission(PermKind.BOTH, 65535)),
    ],
)
def test_permission_parses_kind_and_domid(text: str, perm: Permission) -> None:
    assert Permission.parse(text) == perm


@pytest.mark.parametrize("text", ["n0", "r1", "w2", "b3"])
def test_permission_formats_back_to_its_wire_form(text: str) -> None:
    assert str(Permission.parse(text)) == text


@pytest.mark.parametrize("text", ["", "n", "x0", "0", "r-1", "r1x", "R1", "r65536"])
def test_invalid_permission_is_rejected(text: str) -> None:
    with pytest.raises(InvalidPermission):
        Permission.parse(text)


def test_parse_perms_rejects_an_empty_list() -> None:
    with pytest.raises(InvalidPermission):
        parse_perms([])
