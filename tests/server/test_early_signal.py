"""A SIGTERM that arrives while the server is still starting (before it listens for signals)
stops it cleanly with status 0 once it is up, instead of killing it with status 143."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The signal is sent from inside graph opening: deterministic, and before the server's own
# signal receiver exists.
SCRIPT = """
import os, signal, sys
from nbdserve import app, cli
real_open = app.open_graph
async def open_and_get_signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return await real_open(*args, **kwargs)
app.open_graph = open_and_get_signalled
sys.exit(cli.main(["-k", sys.argv[1], "memory:1M"]))
"""


def test_sigterm_during_start_up_exits_zero(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(sock)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "signal received" in r.stderr and "SIGTERM" in r.stderr
    assert not sock.exists()  # it did start, then stopped and removed its socket
