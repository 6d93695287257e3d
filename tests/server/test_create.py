"""``nbdserve create``: qcow2 images that qemu-img accepts, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def nbdserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserve", *args], capture_output=True,
                          text=True, timeout=60)


def qemu_img_info(path: Path) -> dict[str, object]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    info: dict[str, object] = json.loads(out)
    return info


def test_create_with_options_and_a_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    r = nbdserve("create", "-o", "cluster_size=4K,compat=0.10", str(base), "3M")
    assert r.returncode == 0, r.stderr
    info = qemu_img_info(base)
    assert info["virtual-size"] == 3 << 20 and info["cluster-size"] == 4096
    assert info["format-specific"]["data"]["compat"] == "0.10"  # type: ignore[index]

    # Size from the backing file; the relative name is stored as given.
    r = nbdserve("create", "-b", "base.qcow2", "-F", "qcow2", str(top))
    assert r.returncode == 0, r.stderr
    info = qemu_img_info(top)
    assert info["virtual-size"] == 3 << 20
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    check = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize(("args", "named"), [
    (["IMG", "12Q"], "'12Q'"),
    (["IMG"], "missing SIZE"),
    (["-o", "cluster_size=3K", "IMG", "1M"], "3072"),
    (["-o", "preallocation=full", "IMG", "1M"], "'preallocation=full'"),
    (["-b", "nonexistent.img", "IMG"], "nonexistent.img"),
])
def test_bad_arguments_give_one_line_naming_the_value(tmp_path: Path, args: list[str],
                                                     named: str) -> None:
    img = str(tmp_path / "x.qcow2")
    r = nbdserve("create", *[img if a == "IMG" else a for a in args])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in r.stderr
