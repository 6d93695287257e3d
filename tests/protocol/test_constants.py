"""Every constant against the spec's tables (nbd-protocol.md §1), typed in by hand."""

from __future__ import annotations

import enum

import pytest

import protocol as p

MAGICS = {
    "NBDMAGIC": 0x4E42444D41474943,
    "IHAVEOPT": 0x49484156454F5054,
    "REP_MAGIC": 0x3E889045565A9,
    "REQUEST_MAGIC": 0x25609513,
    "EXTENDED_REQUEST_MAGIC": 0x21E41C71,
    "SIMPLE_REPLY_MAGIC": 0x67446698,
    "STRUCTURED_REPLY_MAGIC": 0x668E33EF,
    "EXTENDED_REPLY_MAGIC": 0x6E8A278C,
    "OLDSTYLE_MAGIC": 0x00420281861253,
}

TABLES: dict[type[enum.Enum], dict[str, int]] = {
    p.HandshakeFlag: {"FIXED_NEWSTYLE": 1, "NO_ZEROES": 2},
    p.ClientFlag: {"FIXED_NEWSTYLE": 1, "NO_ZEROES": 2},
    p.Opt: {
        "EXPORT_NAME": 1, "ABORT": 2, "LIST": 3, "PEEK_EXPORT": 4, "STARTTLS": 5, "INFO": 6,
        "GO": 7, "STRUCTURED_REPLY": 8, "LIST_META_CONTEXT": 9, "SET_META_CONTEXT": 10,
        "EXTENDED_HEADERS": 11,
    },
    p.Rep: {
        "ACK": 1, "SERVER": 2, "INFO": 3, "META_CONTEXT": 4,
        "ERR_UNSUP": 2147483649, "ERR_POLICY": 2147483650, "ERR_INVALID": 2147483651,
        "ERR_PLATFORM": 2147483652, "ERR_TLS_REQD": 2147483653, "ERR_UNKNOWN": 2147483654,
        "ERR_SHUTDOWN": 2147483655, "ERR_BLOCK_SIZE_REQD": 2147483656,
        "ERR_TOO_BIG": 2147483657, "ERR_EXT_HEADER_REQD": 2147483658,
    },
    p.Info: {"EXPORT": 0, "NAME": 1, "DESCRIPTION": 2, "BLOCK_SIZE": 3},
    p.TransmissionFlag: {
        "HAS_FLAGS": 0x0001, "READ_ONLY": 0x0002, "SEND_FLUSH": 0x0004, "SEND_FUA": 0x0008,
        "ROTATIONAL": 0x0010, "SEND_TRIM": 0x0020, "SEND_WRITE_ZEROES": 0x0040,
        "SEND_DF": 0x0080, "CAN_MULTI_CONN": 0x0100, "SEND_RESIZE": 0x0200,
        "SEND_CACHE": 0x0400, "SEND_FAST_ZERO": 0x0800, "BLOCK_STATUS_PAYLOAD": 0x1000,
    },
    p.Cmd: {
        "READ": 0, "WRITE": 1, "DISC": 2, "FLUSH": 3, "TRIM": 4, "CACHE": 5,
        "WRITE_ZEROES": 6, "BLOCK_STATUS": 7, "RESIZE": 8,
    },
    p.CmdFlag: {
        "FUA": 0x01, "NO_HOLE": 0x02, "DF": 0x04, "REQ_ONE": 0x08, "FAST_ZERO": 0x10,
        "PAYLOAD_LEN": 0x20,
    },
    p.ReplyType: {
        "NONE": 0, "OFFSET_DATA": 1, "OFFSET_HOLE": 2, "BLOCK_STATUS": 5,
        "BLOCK_STATUS_EXT": 6, "ERROR": 32769, "ERROR_OFFSET": 32770,
    },
    p.ReplyFlag: {"DONE": 1},
    p.Errno: {
        "EPERM": 1, "EIO": 5, "ENOMEM": 12, "EINVAL": 22, "ENOSPC": 28, "EOVERFLOW": 75,
        "ENOTSUP": 95, "ESHUTDOWN": 108,
    },
    p.StateFlag: {"HOLE": 1, "ZERO": 2},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MAGICS))
def test_magic(name: str) -> None:
    assert getattr(p, name) == MAGICS[name]


def test_magics_spell_their_names() -> None:
    assert p.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert p.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"


@pytest.mark.parametrize("enum_type", list(TABLES), ids=lambda t: t.__name__)
def test_enum_matches_spec_table(enum_type: type[enum.Enum]) -> None:
    # Exactly the spec's members, no more, no fewer, with the spec's values.
    assert {m.name: m.value for m in enum_type} == TABLES[enum_type]


def test_error_classification() -> None:
    assert all(r.is_error == r.name.startswith("ERR_") for r in p.Rep)
    assert [t.name for t in p.ReplyType if t.is_error] == ["ERROR", "ERROR_OFFSET"]
