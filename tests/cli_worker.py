"""A long-lived CLI process for tests that measure memory: one interpreter start for many runs.

Each run reports its exit code, stdout, stderr and the peak resident memory of the run (VmHWM,
reset before each run through /proc/self/clear_refs where Linux allows it; otherwise the
process's high-water mark so far, which still bounds the run). The worker's address space is
capped at 4 GiB, so a regression cannot take the machine down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.safety_helpers import REPO

PEAK_LIMIT = 1024**3  # bytes of resident memory a refused (or cheap) run may reach

WORKER = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from typer.testing import CliRunner
from convtool.cli import app
runner = CliRunner()

def peak():
    # VmHWM: this process's peak resident set; reset before each run where Linux allows it
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

print(json.dumps({"ready": True, "peak": peak()}), flush=True)
for line in sys.stdin:
    args = json.loads(line)
    was_reset = reset()
    result = runner.invoke(app, args)
    print(json.dumps({
        "code": result.exit_code,
        "stdout": result.stdout[-4000:],
        "stderr": result.stderr[-4000:],
        "exception": None if isinstance(result.exception, (SystemExit, type(None)))
        else repr(result.exception),
        "peak": peak(),
        "reset": was_reset,
    }), flush=True)
"""


class Worker:
    """One long-lived CLI process: send an argv, get exit code, output and peak memory."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "COLUMNS": "100"},
        )
        self.baseline = self._read()["peak"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the CLI worker died (exit {self.proc.poll()})"
        return dict(json.loads(line))

    def run(self, args: list[str]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(args) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
