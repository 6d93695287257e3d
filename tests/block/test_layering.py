"""The block layer knows nothing of NBD: nothing under nbdserve/block imports ``protocol``
or the server modules above it (DESIGN.md's one-way rule; protocol/'s side is checked in
tests/protocol/test_imports.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import nbdserve.block

BLOCK = Path(nbdserve.block.__file__).parent
SERVER_MODULES = {p.stem for p in BLOCK.parent.glob("*.py")} - {"__init__"}


def _imports(source: str, package: list[str]) -> list[str]:
    """Absolute module names imported by ``source`` (a module of ``package``), relative
    imports resolved."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def test_block_layer_imports_neither_protocol_nor_the_server() -> None:
    files = sorted(BLOCK.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        package = ["nbdserve", *path.parent.relative_to(BLOCK.parent).parts]
        for name in _imports(path.read_text(), package):
            parts = name.split(".")
            assert parts[0] != "protocol", f"{path.relative_to(BLOCK)} imports {name}"
            if parts[0] == "nbdserve" and len(parts) > 1:
                assert parts[1] == "block" or parts[1] not in SERVER_MODULES, (
                    f"{path.relative_to(BLOCK)} imports {name}"
                )


def test_the_check_sees_a_violation() -> None:
    # The resolver above must notice both spellings, or the test could never fail.
    found = _imports("from ... import connection\nimport protocol\n",
                     ["nbdserve", "block", "drivers"])
    assert "nbdserve.connection" in found and "protocol" in found
