"""Server CPU time and peak memory, read from /proc (Linux only)."""

import os
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue  # the thread exited while we looked
    return kids


def process_tree(pid: int) -> list[int]:
    """*pid* and all its live descendants."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            todo.extend(_children(current))
        except OSError:
            continue
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU of *pid*, its live descendants and the children it has reaped."""
    ticks = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue  # exited between listing and reading
        # After the ")": state is field 3, so utime..cstime (fields 14-17) are indexes 11-14.
        ticks += int(fields[11]) + int(fields[12])
        if member == pid:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLK_TCK


def reset_peak_rss(pid: int) -> None:
    """Restart the VmHWM high-water mark of *pid* (Linux >= 4.0: write 5 to clear_refs)."""
    for member in process_tree(pid):
        try:
            Path(f"/proc/{member}/clear_refs").write_text("5")
        except OSError:
            continue


def peak_rss_bytes(pid: int) -> int:
    """Sum of VmHWM over the server's process tree (an upper bound of the true peak)."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total
