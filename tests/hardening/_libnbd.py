"""Run libnbd client scripts (only Debian's /usr/bin/python3 can ``import nbd``)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from ._server import LIBNBD_PYTHON

PRELUDE = "import json, sys\nimport nbd\nARGS = json.loads(sys.argv[1])\n"


def run(script: str, timeout: float = 60, **args: Any) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``ARGS`` (a dict of ``args``) and ``nbd`` imported."""
    return subprocess.run(
        [LIBNBD_PYTHON, "-c", PRELUDE + script, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(script: str, timeout: float = 60, **args: Any) -> str:
    """Like ``run``, failing the test (with the client's stderr) unless it exits 0."""
    r = run(script, timeout, **args)
    assert r.returncode == 0, f"libnbd client failed ({r.returncode}):\n{r.stderr}"
    return r.stdout


# Connect with TLS; ARGS: sock, certs (a directory or None), tls ("require"|"allow"|"disable").
CONNECT_TLS = """
h = nbd.NBD()
h.set_tls({"require": nbd.TLS_REQUIRE, "allow": nbd.TLS_ALLOW,
           "disable": nbd.TLS_DISABLE}[ARGS["tls"]])
if ARGS.get("certs"):
    h.set_tls_certificates(ARGS["certs"])
h.connect_unix(ARGS["sock"])
"""

# After CONNECT_TLS: prints whether TLS was negotiated, after a write/read-back/flush check.
READ_WRITE = """
data = bytes(range(256)) * 256
h.pwrite(data, 65536)
assert h.pread(len(data), 65536) == data, "read back differs"
h.flush()
print("tls" if h.get_tls_negotiated() else "plain")
h.shutdown()
"""

# A connection attempt that must fail; prints libnbd's error.
MUST_FAIL = (
    """
try:
"""
    + "".join("    " + line + "\n" for line in CONNECT_TLS.strip().splitlines())
    + """
except nbd.Error as e:
    print("refused:", e.string)
    sys.exit(0)
print("connected although it should have been refused")
sys.exit(1)
"""
)
