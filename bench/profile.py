"""Optional py-spy sampling of nbdserve during a cell, and a plain-text summary of where it went."""

import re
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


class ProfilerError(RuntimeError):
    pass


def require_py_spy() -> str:
    found = shutil.which("py-spy")
    if not found:
        raise ProfilerError("--profile needs py-spy on PATH (pip install py-spy)")
    return found


@contextmanager
def sampling(pid: int, out: Path, rate: int = 250) -> Iterator[None]:
    """Sample *pid* (and its subprocesses) while the block runs; collapsed stacks go to *out*."""
    argv = [
        require_py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
        "--rate", str(rate), "--format", "raw", "--output", str(out),
    ]  # fmt: skip
    log = out.with_suffix(".log")
    with log.open("wb") as sink:
        spy = subprocess.Popen(argv, stdout=sink, stderr=sink)
    try:
        yield
    finally:
        # py-spy writes its output when interrupted, as after Control-C.
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def summarise_stacks(collapsed: str, top: int = 25) -> str:
    """Self and inclusive sample shares per frame, from py-spy's collapsed ("raw") output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Per function, not per line: "send (t.py:92)" and "send (t.py:101)" are one frame.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self %  frame"]
    lines += [f"{100 * n / total:6.1f}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total % frame"]
    lines += [f"{100 * n / total:6.1f}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
