"""Running the project's binaries from tests: `python -m module --flags` in the repository root."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(
  module: str, *args: str, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
  """Runs `python -m module *args` from the repository root; asserts it exits 0 (with the tails of
  its stdout and stderr in the message; check=False: whatever it exits with) and returns the
  completed process."""
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc
