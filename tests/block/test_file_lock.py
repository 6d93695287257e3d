"""Image locking of the ``file`` driver: between opens in this process, between processes, and
against QEMU's own tools, which use the same lock bytes."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserve.block.drivers import _file_lock, file
from nbdserve.block.drivers._file_lock import ImageLock, ImageLockedError
from nbdserve.block.drivers.file import FileDriver
from nbdserve.block.errors import GraphError
from nbdserve.block.types import Perm

READ = Perm.CONSISTENT_READ
WRITER = (READ | Perm.WRITE, READ | Perm.WRITE | Perm.WRITE_UNCHANGED)
READER = (READ, Perm.ALL)
#: A reader that wants a consistent view: nobody may write (qemu-img without -U).
STRICT_READER = (READ, READ | Perm.WRITE_UNCHANGED)


class StubNode:
    def __init__(self, read_only: bool = False) -> None:
        self.name = "f0"
        self.read_only = read_only
        self.cache_direct = False


async def open_driver(path: Path, read_only: bool = False, locking: str = "auto") -> FileDriver:
    drv = FileDriver(
        StubNode(read_only),  # type: ignore[arg-type]
        {"filename": str(path), "aio": "threads", "locking": locking},
    )
    await drv.open()
    return drv


def attach(drv: FileDriver, perm: Perm, shared: Perm) -> None:
    """What the graph does when users attach: check, then commit."""
    drv.check_perm(perm, shared)
    drv.set_perm(perm, shared)


def locked_bytes(path: Path) -> set[int]:
    """The lock bytes of QEMU's scheme that some open file description holds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return {
            off
            for off in (*range(100, 104), *range(200, 204))
            if _file_lock._flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, off) != fcntl.F_UNLCK
        }
    finally:
        os.close(fd)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\x01" * 65536)
    return path


async def test_lock_bytes_match_qemu(img: Path) -> None:
    drv = await open_driver(img)
    try:
        assert drv.lock is not None and locked_bytes(img) == set()  # nothing until users attach
        attach(drv, *WRITER)
        # held: consistent read (100), write (101); refused: resize (203), and write (201)
        # because a writer never shares writing with another process.
        assert locked_bytes(img) == {100, 101, 201, 203}
        attach(drv, *READER)  # downgrade: the bytes only the writer needed are dropped
        assert locked_bytes(img) == {100}
        attach(drv, Perm.NONE, Perm.ALL)  # last user gone
        assert locked_bytes(img) == set()
    finally:
        await drv.close()


async def test_two_writers_in_one_process_conflict(img: Path) -> None:
    first, second = await open_driver(img), await open_driver(img)
    try:
        attach(first, *WRITER)
        with pytest.raises(GraphError) as info:
            second.check_perm(*WRITER)
        msg = str(info.value)
        assert 'Failed to get "write" lock' in msg and str(img) in msg and "node 'f0'" in msg
        assert "another process" in msg
        assert locked_bytes(img) == {100, 101, 201, 203}  # the failed check left nothing
        attach(second, *READER)  # a reader that tolerates writers is fine
        with pytest.raises(GraphError, match='Failed to get shared "write" lock'):
            second.check_perm(*STRICT_READER)
        await first.close()  # closing drops its locks
        attach(second, *WRITER)
    finally:
        await first.close()
        await second.close()


async def test_readers_share(img: Path) -> None:
    drivers = [await open_driver(img, read_only=True) for _ in range(3)]
    try:
        for drv in drivers:
            attach(drv, *STRICT_READER)
        writer = await open_driver(img)
        try:
            with pytest.raises(GraphError, match='Failed to get "write" lock'):
                writer.check_perm(*WRITER)
        finally:
            await writer.close()
    finally:
        for drv in drivers:
            await drv.close()


async def test_abort_restores_the_previous_locks(img: Path) -> None:
    drv = await open_driver(img)
    try:
        attach(drv, *READER)
        drv.check_perm(*WRITER)
        assert {100, 101, 201, 203} <= locked_bytes(img)
        drv.abort_perm()
        assert locked_bytes(img) == {100}
    finally:
        await drv.close()


async def test_locking_off_takes_no_locks(img: Path) -> None:
    first, second = await open_driver(img, locking="off"), await open_driver(img, locking="off")
    try:
        assert first.lock is None
        attach(first, *WRITER)
        attach(second, *WRITER)
        assert locked_bytes(img) == set()
    finally:
        await first.close()
        await second.close()


async def test_locking_without_ofd_support(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(file, "ofd_locks_supported", lambda fd: False)
    drv = await open_driver(img)  # auto: lock where possible, here not
    assert drv.lock is None
    await drv.close()
    with pytest.raises(GraphError, match="locking=on, but the filesystem does not support"):
        await open_driver(img, locking="on")


def test_lock_error_is_an_oserror_with_eagain(img: Path) -> None:
    fd1, fd2 = os.open(img, os.O_RDWR), os.open(img, os.O_RDWR)
    try:
        exclusive = (READ | Perm.WRITE, READ | Perm.WRITE_UNCHANGED)
        first = ImageLock(fd1, str(img))
        first.update(*exclusive)
        second = ImageLock(fd2, str(img))
        with pytest.raises(ImageLockedError) as info:
            second.update(*exclusive)
        assert info.value.errno == 11  # EAGAIN, as QEMU reports it
        assert second.held == second.refused == Perm.NONE
        # Plain QEMU semantics, without the driver's policy: writers sharing writes coexist.
        first.update(*WRITER)
        second.update(*WRITER)
    finally:
        os.close(fd1)
        os.close(fd2)


def test_an_exclusive_lock_on_our_byte_is_a_conflict(img: Path) -> None:
    fd1, fd2 = os.open(img, os.O_RDWR), os.open(img, os.O_RDWR)
    try:
        _file_lock._flock(fd1, fcntl.F_OFD_SETLK, fcntl.F_WRLCK, 101)  # a foreign guard
        lock = ImageLock(fd2, str(img))
        with pytest.raises(ImageLockedError, match="Failed to lock byte 101"):
            lock.update(*WRITER)
        assert lock.held == lock.refused == Perm.NONE
    finally:
        os.close(fd1)
        os.close(fd2)


# -- other processes -----------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import sys, trio
    from nbdserve.block.drivers.file import FileDriver
    from nbdserve.block.errors import GraphError
    from nbdserve.block.types import Perm

    class Node:
        name, read_only, cache_direct = "child", False, False

    async def main():
        drv = FileDriver(Node(), {"filename": sys.argv[1], "aio": "threads", "locking": "auto"})
        await drv.open()
        perm = Perm.CONSISTENT_READ | Perm.WRITE
        try:
            drv.check_perm(perm, Perm.ALL)
        except GraphError as exc:
            print("refused:", exc, flush=True)
            sys.exit(3)
        drv.set_perm(perm, Perm.ALL)
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the parent closes our stdin

    trio.run(main)
    """
)


@pytest.fixture
def child_writer(img: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(img)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_writer_in_another_process_is_refused(
    img: Path, child_writer: subprocess.Popen[str]
) -> None:
    assert child_writer.stdout is not None and child_writer.stdin is not None
    assert child_writer.stdout.readline().strip() == "locked"
    drv = await open_driver(img)
    try:
        with pytest.raises(GraphError, match=r'Failed to get (shared )?"write" lock'):
            drv.check_perm(*WRITER)
        child_writer.stdin.close()  # the child exits; the kernel drops its locks
        assert child_writer.wait(30) == 0
        attach(drv, *WRITER)
    finally:
        await drv.close()


async def test_another_process_is_refused_while_we_write(img: Path) -> None:
    drv = await open_driver(img)
    try:
        attach(drv, *WRITER)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(img)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 3, out.stderr
        assert 'Failed to get "write" lock' in out.stdout and str(img) in out.stdout
    finally:
        await drv.close()


# -- QEMU's tools ----------------------------------------------------------------------------------
def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def test_qemu_io_cannot_write_while_we_do(img: Path) -> None:
    drv = await open_driver(img)
    try:
        attach(drv, *WRITER)
        out = qemu_io("-f", "raw", "-c", "write 0 512", str(img))
        assert out.returncode != 0
        assert 'Failed to get "write" lock' in out.stderr + out.stdout
        assert img.read_bytes()[:512] == b"\x01" * 512
        # qemu's explicit "share everything" read-only open still works, as against QEMU
        out = qemu_io("-U", "-r", "-f", "raw", "-c", "read -P 1 0 512", str(img))
        assert out.returncode == 0, out.stderr
    finally:
        await drv.close()
    out = qemu_io("-f", "raw", "-c", "write -P 2 0 512", str(img))
    assert out.returncode == 0, out.stderr + out.stdout
    assert img.read_bytes()[:512] == b"\x02" * 512


async def test_we_cannot_write_while_qemu_nbd_serves_the_image(
    img: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "qemu-nbd.pid"
    subprocess.run(
        ["qemu-nbd", "--fork", "--pid-file", str(pidfile), "-f", "raw",
         "-k", str(tmp_path / "nbd.sock"), str(img)],
        check=True, timeout=60,
    )
    pid = int(pidfile.read_text())
    try:
        drv = await open_driver(img)
        try:
            with pytest.raises(GraphError, match=r'Failed to get (shared )?"write" lock'):
                drv.check_perm(*WRITER)
            attach(drv, *READER)  # reading alongside, sharing everything, is allowed
        finally:
            await drv.close()
    finally:
        os.kill(pid, 15)
        _wait_gone(pid)


def _wait_gone(pid: int) -> None:
    import time

    for _ in range(600):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
