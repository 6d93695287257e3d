"""Building graphs from options (and the errors for bad ones), permissions between users,
and graph edits as all-or-nothing transactions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nbdserve.block import Graph, GraphError, Perm, ReqFlags, Role, open_graph, parse_dotted

from .recording import PickyDriver, register_picky

R = Perm.CONSISTENT_READ
RW = Perm.CONSISTENT_READ | Perm.WRITE


# -- building -------------------------------------------------------------------------------


async def test_nested_children_and_references() -> None:
    graph = await open_graph(
        [
            {"driver": "memory", "node-name": "m0", "size": "1M"},
            "driver=raw,node-name=r0,file=m0,offset=4K",
            {"driver": "raw", "node-name": "r1", "file": {"driver": "memory", "size": 65536}},
        ]
    )
    r0, r1 = graph.node("r0"), graph.node("r1")
    assert r0.children["file"].node is graph.node("m0")
    assert r0.children["file"].role is Role.FILE
    assert r0.size == (1 << 20) - 4096
    auto = r1.children["file"].node
    assert auto.name.startswith("#") and auto.name in graph.nodes
    # Inline children default to discard=unmap: the top node's policy is the gate.
    assert auto.discard == "unmap" and r1.discard == "ignore"
    await graph.close()
    assert graph.nodes == {}


async def test_inheritance_of_read_only_and_backing_defaults() -> None:
    graph = await open_graph(
        [
            {
                "driver": "memory",
                "node-name": "top",
                "size": "1M",
                "cache": {"no-flush": True},
                "backing": {"driver": "memory", "node-name": "b", "size": "1M"},
            },
            {
                "driver": "raw",
                "node-name": "ro",
                "read-only": "on",
                "file": {"driver": "memory", "node-name": "f", "size": "1M"},
            },
        ]
    )
    assert graph.node("b").read_only  # backing files default to read-only
    assert graph.node("b").cache_no_flush
    assert graph.node("f").read_only  # inherited from its read-only parent
    await graph.close()


def _bad(options: Any, *needles: str) -> Any:
    return pytest.param(options, needles, id=needles[0])


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        _bad({"driver": "memory", "node-name": "m", "size": "1M", "colour": 1}, "'m'", "colour"),
        _bad({"driver": "memory", "node-name": "m"}, "'m'", "'size'", "missing"),
        _bad({"driver": "memory", "node-name": "m", "size": "big"}, "'m'", "'size'", "size"),
        _bad({"driver": "memory", "node-name": "m", "size": -1}, "'m'", "'size'", "negative"),
        _bad({"driver": "null", "node-name": "m", "read-zeroes": "maybe"}, "'read-zeroes'"),
        _bad({"driver": "floppy", "node-name": "m"}, "'m'", "'driver'", "floppy", "known"),
        _bad({"node-name": "m", "size": 1}, "'m'", "'driver'", "missing"),
        _bad({"driver": "raw", "node-name": "r"}, "'r'", "'file'", "missing"),
        _bad({"driver": "raw", "node-name": "r", "file": "nope"}, "'r'", "'file'", "'nope'"),
        _bad({"driver": "raw", "node-name": "r", "file": 5}, "'r'", "'file'"),
        _bad({"driver": "raw", "node-name": "r", "file": "r"}, "'r'", "cycle"),
        _bad({"driver": "null", "node-name": "1bad"}, "invalid node-name"),
        _bad({"driver": "null", "node-name": "n", "discard": "maybe"}, "'n'", "'discard'"),
        _bad({"driver": "null", "node-name": "n", "detect-zeroes": "unmap"}, "'detect-zeroes'"),
        _bad({"driver": "null", "node-name": "n", "cache": {"fast": 1}}, "'cache.fast'"),
        _bad(
            {
                "driver": "raw",
                "node-name": "r",
                "offset": "2M",
                "file": {"driver": "memory", "size": "1M"},
            },
            "'r'",
            "'offset'",
            "past the end",
        ),
        _bad(
            {
                "driver": "blkdebug",
                "node-name": "d",
                "image": {"driver": "null"},
                "inject-error": [{"errno": "EWHAT"}],
            },
            "'d'",
            "'inject-error.0.errno'",
        ),
    ],
)
async def test_bad_options_name_the_node_and_key(options: Any, needles: tuple[str, ...]) -> None:
    graph = Graph()
    with pytest.raises(GraphError) as info:
        await graph.add(options)
    for needle in needles:
        assert needle in str(info.value)
    assert graph.nodes == {}  # nothing half-built is left behind


async def test_missing_file_is_a_graph_error(tmp_path: Path) -> None:
    with pytest.raises(GraphError) as info:
        await open_graph([{"driver": "file", "node-name": "f", "filename": str(tmp_path / "x")}])
    assert "'f'" in str(info.value)


async def test_duplicate_node_name() -> None:
    graph = await open_graph(["driver=null,node-name=n"])
    with pytest.raises(GraphError, match="duplicate node-name 'n'"):
        await graph.add("driver=null,node-name=n")
    with pytest.raises(GraphError, match="duplicate node-name 'n'"):
        await graph.add({"driver": "raw", "file": {"driver": "null", "node-name": "n"}})
    assert list(graph.nodes) == ["n"]
    await graph.close()


async def test_failed_add_removes_the_children_it_opened() -> None:
    graph = await open_graph(["driver=memory,node-name=keep,size=1M"])
    with pytest.raises(GraphError):
        await graph.add(
            {
                "driver": "raw",
                "node-name": "r",
                "size": "2M",  # larger than the file: fails after the child is open
                "file": {"driver": "memory", "node-name": "inner", "size": "1M"},
            }
        )
    assert list(graph.nodes) == ["keep"]
    await graph.close()


async def test_open_graph_is_all_or_nothing() -> None:
    with pytest.raises(GraphError, match="'b'"):
        await open_graph(["driver=null,node-name=a", "driver=raw,node-name=b,file=zz"])


def test_parse_dotted() -> None:
    assert parse_dotted("driver=file,filename=a,,b.img,node-name=f0") == {
        "driver": "file",
        "filename": "a,b.img",
        "node-name": "f0",
    }
    assert parse_dotted("driver=raw,file.driver=file,file.filename=x,cache.direct=on") == {
        "driver": "raw",
        "file": {"driver": "file", "filename": "x"},
        "cache": {"direct": "on"},
    }
    assert parse_dotted("inject-error.0.errno=EIO,inject-error.1.iotype.0=read") == {
        "inject-error": [{"errno": "EIO"}, {"iotype": ["read"]}]
    }
    for bad in ["driver", "a=1,a=2", "a.=1", "a=1,a.b=2"]:
        with pytest.raises(GraphError):
            parse_dotted(bad)


async def test_dotted_values_are_typed_by_the_driver() -> None:
    graph = await open_graph(
        [
            "driver=blkdebug,node-name=d,image.driver=memory,image.size=64K,align=4K,"
            "inject-error.0.errno=ENOSPC,inject-error.0.iotype=write,inject-error.0.offset=8K,"
            "inject-error.0.once=on"
        ]
    )
    child = graph.attach("d", perm=RW)
    assert child.size == 65536 and child.limits.request_alignment == 4096
    with pytest.raises(OSError) as info:
        await child.write(8192, b"x" * 4096)
    assert info.value.errno == 28
    await child.write(8192, b"x" * 4096)  # once: retired
    await graph.close()


# -- permissions ------------------------------------------------------------------------------


async def test_conflict_names_both_users() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M"])
    graph.attach("m", perm=R, shared=R, user="export 'a'")
    with pytest.raises(GraphError) as info:
        graph.attach("m", perm=RW, user="export 'b'")
    msg = str(info.value)
    assert "export 'a'" in msg and "export 'b'" in msg and "write" in msg and "'m'" in msg
    # The other direction: an existing writer, a newcomer who won't share writes.
    graph2 = await open_graph(["driver=memory,node-name=m,size=1M"])
    graph2.attach("m", perm=RW, user="writer")
    with pytest.raises(GraphError, match=r"writer.*exclusive|exclusive.*writer"):
        graph2.attach("m", perm=R, shared=R, user="exclusive")
    await graph.close()
    await graph2.close()


async def test_conflict_through_a_parent_node() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M", "driver=raw,node-name=r,file=m"])
    graph.attach("m", perm=R, shared=R, user="reader of m")
    # raw (writable) takes write on its file child: refused, naming raw's edge.
    with pytest.raises(GraphError, match="node 'r' \\(child 'file'\\)"):
        graph.attach("r", perm=RW, user="export r")
    await graph.close()


async def test_read_only_node_refuses_writers() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M,read-only=on"])
    with pytest.raises(GraphError, match="read-only"):
        graph.attach("m", perm=RW, user="writer")
    reader = graph.attach("m", perm=R)
    assert reader.caps.read_only
    await graph.close()


async def test_detach_releases_permissions() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M"])
    first = graph.attach("m", perm=RW, shared=R, user="first")
    with pytest.raises(GraphError):
        graph.attach("m", perm=RW, user="second")
    first.detach()
    second = graph.attach("m", perm=RW, user="second")
    await second.write(0, b"ok")
    with pytest.raises(OSError):
        await first.write(0, b"detached edges hold nothing")
    await graph.close()


async def test_driver_refusal_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    register_picky(monkeypatch)
    graph = await open_graph(
        [{"driver": "picky", "node-name": "p", "size": "1M", "refuse-write": True}]
    )
    drv = graph.node("p").driver
    assert isinstance(drv, PickyDriver)
    reader = graph.attach("p", perm=R, user="reader")
    assert drv.log == ["check 1", "set 1"]
    with pytest.raises(GraphError, match="locked by another process"):
        graph.attach("p", perm=RW, user="writer")
    assert drv.log[-1] == "check 3"  # the refusing check took nothing: no abort for it
    assert graph.node("p").parents == [reader] and graph.node("p").perm == R
    await graph.close()


async def test_refusal_below_aborts_the_nodes_already_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    register_picky(monkeypatch)
    graph = await open_graph(
        [
            {"driver": "picky", "node-name": "low", "size": "1M", "refuse-write": True},
            {"driver": "picky", "node-name": "top", "size": "1M", "file": "low"},
        ]
    )
    top, low = graph.node("top"), graph.node("low")
    assert isinstance(top.driver, PickyDriver) and isinstance(low.driver, PickyDriver)
    top.driver.log.clear()
    low.driver.log.clear()
    with pytest.raises(GraphError, match="'low'"):
        graph.attach("top", perm=RW, user="writer")
    assert top.driver.log == ["check 3", "abort"]
    assert low.driver.log == ["check 3"]
    assert top.parents == [] and top.perm == Perm.NONE
    assert top.children["file"].perm == Perm.NONE and low.perm == Perm.NONE
    await graph.close()


async def test_replace_node_moves_users(monkeypatch: pytest.MonkeyPatch) -> None:
    graph = await open_graph(
        ["driver=memory,node-name=a,size=1M", "driver=memory,node-name=b,size=1M"]
    )
    user = graph.attach("a", perm=RW, user="export")
    await user.write(0, b"A")
    graph.replace_node("a", "b")
    assert user.node is graph.node("b") and not graph.node("a").parents
    assert bytes(await user.read(0, 1)) == b"\0"
    await graph.close()


async def test_insert_filter_above_a_node() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M"])
    user = graph.attach("m", perm=RW, user="export")
    await graph.add(
        {
            "driver": "blkdebug",
            "node-name": "dbg",
            "image": "m",
            "inject-error": [{"iotype": "read", "offset": 0}],
        }
    )
    graph.replace_node("m", "dbg")  # dbg's own edge to m stays
    assert user.node is graph.node("dbg")
    with pytest.raises(OSError):
        await user.read(0, 10)
    await graph.close()


async def test_replace_node_refuses_cycles_and_changes_nothing() -> None:
    graph = await open_graph(
        [
            "driver=memory,node-name=m,size=1M",
            "driver=raw,node-name=r,file=m",
            "driver=raw,node-name=top,file=r",
        ]
    )
    user = graph.attach("top", perm=RW, user="export")
    before = {n: (node.perm, [e.user for e in node.parents]) for n, node in graph.nodes.items()}
    with pytest.raises(GraphError, match="cycle"):
        graph.replace_node("m", "top")  # r -> m would become r -> top -> r
    after = {n: (node.perm, [e.user for e in node.parents]) for n, node in graph.nodes.items()}
    assert before == after
    await user.write(0, b"still works")
    await graph.close()


async def test_replace_node_conflict_is_atomic() -> None:
    graph = await open_graph(
        ["driver=memory,node-name=a,size=1M", "driver=memory,node-name=b,size=1M"]
    )
    u1 = graph.attach("a", perm=RW, user="one")
    u2 = graph.attach("a", perm=R, user="two")
    graph.attach("b", perm=R, shared=R, user="b's exclusive reader")
    with pytest.raises(GraphError, match="exclusive"):
        graph.replace_node("a", "b")
    assert u1.node is graph.node("a") and u2.node is graph.node("a")  # neither moved
    await graph.close()


async def test_remove_refuses_nodes_in_use() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M", "driver=raw,node-name=r,file=m"])
    with pytest.raises(GraphError, match="in use by node 'r'"):
        await graph.remove("m")
    await graph.remove("r")
    await graph.remove("m")
    assert graph.nodes == {}
    # Inline (auto-named) children go with their parent; named ones stay.
    await graph.add(
        {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "raw", "file": {"driver": "memory", "node-name": "m", "size": 99}},
        }
    )
    assert len(graph.nodes) == 3
    await graph.remove("r")
    assert list(graph.nodes) == ["m"]


async def test_truncate_needs_resize_permission() -> None:
    graph = await open_graph(["driver=memory,node-name=m,size=1M"])
    plain = graph.attach("m", perm=RW, user="plain")
    with pytest.raises(OSError):
        await plain.truncate(2 << 20)
    resizer = graph.attach("m", perm=RW | Perm.RESIZE, user="resizer")
    await resizer.truncate(2 << 20)
    assert plain.size == 2 << 20
    await plain.write((2 << 20) - 1, b"z", ReqFlags.FUA)
    await graph.close()


async def test_graph_as_async_context_manager() -> None:
    async with await open_graph(["driver=memory,node-name=m,size=64K"]) as graph:
        await graph.attach("m", perm=RW).write(0, b"x")
    assert graph.nodes == {}


def test_parse_size() -> None:
    from nbdserve.block import parse_size

    assert parse_size(512) == 512
    assert parse_size("512") == 512
    assert parse_size("64K") == 65536
    assert parse_size("2MiB") == 2 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("1t") == 1 << 40
    assert parse_size("9007199254740993") == 2**53 + 1  # exact: no float on the way
    for bad in ["", "1X", "-1", "0.3", "9E", True, None, 1.5]:
        with pytest.raises(ValueError):
            parse_size(bad)


async def test_info_describes_the_graph() -> None:
    import json

    graph = await open_graph(["driver=memory,node-name=m,size=1M", "driver=raw,node-name=r,file=m"])
    graph.attach("r", perm=RW, user="export 'r'")
    info = graph.info()
    assert [n["node-name"] for n in info] == ["r", "m"]
    assert info[0]["children"] == {
        "file": {"node": "m", "role": "file", "perm": "consistent-read, write"}
    }
    assert info[0]["users"] == ["export 'r'"] and info[1]["users"] == ["node 'r' (child 'file')"]
    json.dumps(info)
    await graph.close()
