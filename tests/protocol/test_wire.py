"""Every message round-trips; compiled == interpreted; struct fast paths == the schemas."""

# The table of hand-written wire bytes reads best one message per line.
# ruff: noqa: E501

from __future__ import annotations

import struct
from typing import Any

import pytest
from construct import Construct, ConstructError
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    RemoteProtocolError,
)
from protocol import _wire as wire

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)


def _plain(value: Any) -> Any:
    """A parsed value without construct's bookkeeping keys (``_io``, ``_flagsenum``)."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items() if not k.startswith("_")}
    return value


def _subset(parsed: Any, obj: dict[str, Any]) -> None:
    for key, value in obj.items():
        assert _plain(parsed[key]) == _plain(value), key


def common(schema: Construct, obj: dict[str, Any], data: bytes, size: int | None) -> None:
    """construct's own test idiom: build, parse, sizeof, and the compiled form agrees."""
    assert schema.build(obj) == data
    parsed = schema.parse(data)
    _subset(parsed, obj)
    assert schema.build(parsed) == data
    if size is not None:
        assert schema.sizeof() == size == len(data)
    compiled = schema.compile()
    assert compiled.build(obj) == data
    _subset(compiled.parse(data), obj)


EXT = [dict(length=1, flags=2), dict(length=3, flags=0)]

# (schema, object, expected bytes written out by hand, fixed size or None)
CASES: list[tuple[str, dict[str, Any], bytes, int | None]] = [
    ("Greeting", {"flags": 3}, b"NBDMAGICIHAVEOPT\x00\x03", 18),
    ("ClientFlags", {"flags": 1}, b"\0\0\0\1", 4),
    ("OptionHeader", {"magic": 7, "option": 3, "length": 0}, bytes(7) + b"\7" + b"\0\0\0\3" + bytes(4), 16),
    ("OptionRequest", {"option": 7, "data": b"xy"}, b"IHAVEOPT\0\0\0\7\0\0\0\2xy", None),
    ("OptionReplyHeader", {"magic": 1, "option": 2, "type": 3, "length": 4}, bytes(7) + b"\1\0\0\0\2\0\0\0\3\0\0\0\4", 20),
    ("OptionReply", {"option": 3, "type": 1, "data": b""}, bytes.fromhex("0003e889045565a9") + b"\0\0\0\3\0\0\0\1\0\0\0\0", None),
    ("RepServer", {"name": "ab", "description": "d"}, b"\0\0\0\2abd", None),
    ("RepServer", {"name": "", "description": ""}, bytes(4), None),
    ("RepMetaContext", {"context_id": 9, "name": "base:allocation"}, b"\0\0\0\x09base:allocation", None),
    ("InfoExport", {"size": 1 << 40, "flags": 0x8D}, b"\0\0" + (1 << 40).to_bytes(8, "big") + b"\0\x8d", 12),
    ("InfoName", {"name": "n"}, b"\0\1n", None),
    ("InfoDescription", {"description": "dd"}, b"\0\2dd", None),
    ("InfoBlockSize", {"minimum": 1, "preferred": 4096, "maximum": 1 << 25}, b"\0\3\0\0\0\1\0\0\x10\0\x02\0\0\0", 14),
    ("InfoType", {"type": 3}, b"\0\3", 2),
    ("InfoRequest", {"name": "x", "requests": [3, 1]}, b"\0\0\0\1x\0\2\0\3\0\1", None),
    ("InfoRequest", {"name": "", "requests": []}, bytes(6), None),
    ("MetaContextRequest", {"name": "e", "queries": ["base:", "qemu:x"]}, b"\0\0\0\1e\0\0\0\2\0\0\0\5base:\0\0\0\6qemu:x", None),
    ("MetaContextRequest", {"name": "", "queries": []}, bytes(8), None),
    ("ExportNameReply", {"size": 5, "flags": 1}, bytes(7) + b"\5\0\1" + bytes(124), 134),
    ("ExportNameReplyShort", {"size": 5, "flags": 1}, bytes(7) + b"\5\0\1", 10),
    ("Request", {"flags": 1, "type": 1, "cookie": 2, "offset": 3, "length": 4}, bytes.fromhex("25609513 0001 0001") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big") + b"\0\0\0\4", 28),
    ("ExtendedRequest", {"flags": 0x20, "type": 1, "cookie": 2, "offset": 3, "length": 1 << 33}, bytes.fromhex("21e41c71 0020 0001") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big") + (1 << 33).to_bytes(8, "big"), 32),
    ("SimpleReply", {"error": 22, "cookie": 7}, bytes.fromhex("67446698 00000016") + (7).to_bytes(8, "big"), 16),
    ("ChunkHeader", {"flags": 1, "type": 0x8001, "cookie": 7, "length": 6}, bytes.fromhex("668e33ef 0001 8001") + (7).to_bytes(8, "big") + b"\0\0\0\6", 20),
    ("ExtendedChunkHeader", {"flags": 1, "type": 0, "cookie": 7, "offset": 9, "length": 0}, bytes.fromhex("6e8a278c 0001 0000") + (7).to_bytes(8, "big") + (9).to_bytes(8, "big") + bytes(8), 32),
    ("ReplyMagic", {"magic": SIMPLE_REPLY_MAGIC}, bytes.fromhex("67446698"), 4),
    ("OffsetData", {"offset": 512, "data": b"abc"}, (512).to_bytes(8, "big") + b"abc", None),
    ("OffsetDataHeader", {"offset": 512}, (512).to_bytes(8, "big"), 8),
    ("OffsetHole", {"offset": 512, "length": 4096}, (512).to_bytes(8, "big") + (4096).to_bytes(4, "big"), 12),
    ("BlockStatus", {"context_id": 1, "extents": EXT}, b"\0\0\0\1" + b"\0\0\0\1\0\0\0\2\0\0\0\3\0\0\0\0", None),
    ("BlockStatusExt", {"context_id": 1, "extents": EXT}, b"\0\0\0\1\0\0\0\2" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big") + bytes(8), None),
    ("ErrorChunk", {"error": 5, "message": "io"}, b"\0\0\0\5\0\2io", None),
    ("ErrorOffsetChunk", {"error": 5, "message": "", "offset": 9}, b"\0\0\0\5\0\0" + (9).to_bytes(8, "big"), None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "obj", "data", "size"), CASES, ids=[c[0] for c in CASES])
def test_round_trip(name: str, obj: dict[str, Any], data: bytes, size: int | None) -> None:
    common(getattr(wire, name), obj, data, size)


def test_every_schema_has_a_case() -> None:
    assert set(wire.SCHEMAS) == {c[0] for c in CASES}


@pytest.mark.parametrize("name", ["Greeting", "SimpleReply", "ChunkHeader", "ExportNameReply"])
def test_const_mismatch_is_a_construct_error(name: str) -> None:
    schema = wire.SCHEMAS[name]
    with pytest.raises(ConstructError):
        schema.parse(b"\xff" * schema.sizeof())


def test_parse_wraps_errors_as_remote() -> None:
    with pytest.raises(RemoteProtocolError, match="malformed"):
        wire.parse(wire.InfoRequest, b"\0\0\0\5ab", "INFO request")
    with pytest.raises(RemoteProtocolError, match="extra bytes"):
        wire.parse(wire.OffsetHole, bytes(13), "hole")
    with pytest.raises(RemoteProtocolError):
        wire.parse(wire.RepServer, b"\0\0\0\2\xff\xfe", "server")  # invalid UTF-8


# -- compiled == interpreted == struct, over generated inputs ----------------------------------

FAST = [
    (wire.Request, wire.RequestCompiled, wire.REQUEST, REQUEST_MAGIC,
     ["flags", "type", "cookie", "offset", "length"], [u16, u16, u64, u64, u32]),
    (wire.ExtendedRequest, wire.ExtendedRequestCompiled, wire.EXTENDED_REQUEST,
     EXTENDED_REQUEST_MAGIC, ["flags", "type", "cookie", "offset", "length"],
     [u16, u16, u64, u64, u64]),
    (wire.SimpleReply, wire.SimpleReplyCompiled, wire.SIMPLE_REPLY, SIMPLE_REPLY_MAGIC,
     ["error", "cookie"], [u32, u64]),
    (wire.ChunkHeader, wire.ChunkHeaderCompiled, wire.CHUNK_HEADER, STRUCTURED_REPLY_MAGIC,
     ["flags", "type", "cookie", "length"], [u16, u16, u64, u32]),
    (wire.ExtendedChunkHeader, wire.ExtendedChunkHeaderCompiled, wire.EXTENDED_CHUNK_HEADER,
     EXTENDED_REPLY_MAGIC, ["flags", "type", "cookie", "offset", "length"],
     [u16, u16, u64, u64, u64]),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", FAST, ids=["Request", "ExtendedRequest", "SimpleReply", "ChunkHeader", "ExtendedChunk"]
)
@settings(deadline=None)  # timing never decides a test
@given(data=st.data())
def test_fast_paths_identical(case: tuple[Any, ...], data: st.DataObject) -> None:
    schema, compiled, fast, magic, names, strategies = case
    values = [data.draw(s) for s in strategies]
    obj = dict(zip(names, values, strict=True))
    built = schema.build(obj)
    assert compiled.build(obj) == built
    assert fast.pack(magic, *values) == built
    assert fast.size == schema.sizeof()
    for parsed in (schema.parse(built), compiled.parse(built)):
        assert [parsed[n] for n in names] == values
    assert fast.unpack(built) == (magic, *values)


@settings(deadline=None)  # timing never decides a test
@given(offset=u64, length=u32, cookie=u64, flags=u16, kind=u16)
def test_combined_fast_paths_identical(
    offset: int, length: int, cookie: int, flags: int, kind: int
) -> None:
    # Header + OFFSET_DATA offset packed in one call == the two schemas back to back.
    head = wire.ChunkHeader.build(dict(flags=flags, type=kind, cookie=cookie, length=length))
    assert wire.CHUNK_HEADER_OFFSET.pack(
        STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length, offset
    ) == head + wire.OffsetDataHeader.build(dict(offset=offset))
    ext = wire.ExtendedChunkHeader.build(
        dict(flags=flags, type=kind, cookie=cookie, offset=offset, length=length)
    )
    assert wire.EXTENDED_CHUNK_HEADER_OFFSET.pack(
        EXTENDED_REPLY_MAGIC, flags, kind, cookie, offset, length, offset
    ) == ext + wire.OffsetDataHeader.build(dict(offset=offset))
    hole = wire.OffsetHole.build(dict(offset=offset, length=length))
    assert wire.OFFSET_HOLE.pack(offset, length) == hole
    assert wire.OPTION_HEADER.pack(cookie, length, kind) == wire.OptionHeader.build(
        dict(magic=cookie, option=length, length=kind)
    )
    assert wire.OPTION_REPLY_HEADER.pack(cookie, length, kind, flags) == (
        wire.OptionReplyHeader.build(dict(magic=cookie, option=length, type=kind, length=flags))
    )


@settings(deadline=None)  # timing never decides a test
@given(raw=st.binary(min_size=28, max_size=28))
def test_compiled_parse_agrees_on_arbitrary_headers(raw: bytes) -> None:
    # Interpreted and compiled either both parse to the same values or both reject the magic.
    results: list[dict[str, Any] | None] = []
    for schema in (wire.Request, wire.RequestCompiled):
        try:
            results.append(dict(schema.parse(raw)))
        except ConstructError:
            results.append(None)
    assert results[0] == results[1]
    assert (results[0] is None) == (raw[:4] != REQUEST_MAGIC.to_bytes(4, "big"))


BLOCK_STATUS_EXT_COMPILED = wire.BlockStatusExt.compile()
ERROR_CHUNK_COMPILED = wire.ErrorChunk.compile()


@settings(deadline=None)  # timing never decides a test
@given(
    context_id=u32,
    extents=st.lists(st.tuples(u64, u64), min_size=1, max_size=5),
    message=text,
    error=u32,
)
def test_variable_payloads_compiled_agree(
    context_id: int, extents: list[tuple[int, int]], message: str, error: int
) -> None:
    ext = [dict(length=a, flags=b) for a, b in extents]
    obj = dict(context_id=context_id, extents=ext)
    data = wire.BlockStatusExt.build(obj)
    assert BLOCK_STATUS_EXT_COMPILED.build(obj) == data
    parsed = BLOCK_STATUS_EXT_COMPILED.parse(data)
    assert [(e.length, e.flags) for e in parsed.extents] == extents
    err = dict(error=error, message=message)
    assert ERROR_CHUNK_COMPILED.build(err) == wire.ErrorChunk.build(err)
    assert ERROR_CHUNK_COMPILED.parse(wire.ErrorChunk.build(err)).message == message


def test_struct_formats_are_big_endian() -> None:
    for value in vars(wire).values():
        if isinstance(value, struct.Struct):
            assert value.format.startswith(">")
