"""protocol/ imports only the standard library and construct, and exports what it documents."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import protocol

PACKAGE = Path(protocol.__file__).parent
ALLOWED_THIRD_PARTY = {"construct"}


def test_ast_imports_are_stdlib_or_construct() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the package
                    continue
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            for root in roots:
                ok = root in sys.stdlib_module_names or root in ALLOWED_THIRD_PARTY
                assert ok, f"{path.name} imports {root}"


def test_runtime_modules_are_stdlib_or_construct() -> None:
    # A fresh interpreter, so nothing the test runner loaded can hide a dependency.
    code = (
        "import sys, json; before = set(sys.modules); import protocol; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = {name.split(".")[0] for name in json.loads(out)}
    foreign = {
        name
        for name in loaded
        if name not in sys.stdlib_module_names
        and name not in ALLOWED_THIRD_PARTY
        and name != "protocol"
    }
    assert foreign == set()
    assert "nbdserve" not in loaded and "trio" not in loaded


def test_all_is_complete_and_importable() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    public = {n for n in vars(protocol) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(protocol, n)).__name__ == "module"}
    assert public - modules - {"annotations"} <= set(protocol.__all__)
