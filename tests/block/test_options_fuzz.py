"""Bad input gets a clear error, never a crash: arbitrary option text and option dicts either
open a node or raise GraphError."""

from __future__ import annotations

from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.block import Graph, GraphError, parse_dotted

KEYS = st.sampled_from(
    [
        "driver",
        "node-name",
        "size",
        "file",
        "backing",
        "image",
        "offset",
        "read-only",
        "discard",
        "detect-zeroes",
        "cache",
        "cache.direct",
        "inject-error",
        "align",
        "read-zeroes",
        "latency-ns",
        "x",
        "0",
        "file.driver",
        "file.size",
        "iotype",
        "errno",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 1 << 21),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "memory",
            "null",
            "raw",
            "blkdebug",
            "1M",
            "on",
            "unmap",
            "EIO",
            "read",
            "",
            "-1",
            "m0",
            "#x",
        ]
    ),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=8,
)
OPTIONS = st.dictionaries(KEYS, VALUES, max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=60))
def test_dotted_text_parses_or_raises_graph_error(text: str) -> None:
    try:
        result = parse_dotted(text)
    except GraphError:
        return
    assert isinstance(result, dict)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPTIONS)
def test_option_dicts_open_or_raise_graph_error(options: dict[str, Any]) -> None:
    async def attempt() -> None:
        graph = Graph()
        try:
            await graph.add(options)
        except GraphError:
            assert graph.nodes == {}
        finally:
            await graph.close()

    trio.run(attempt)
