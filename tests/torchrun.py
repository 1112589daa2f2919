"""Launch a test's distributed worker under ``torchrun`` (CPU, gloo) with a time limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, out: Path, *, world: int = 2, timeout_s: float = 300) -> None:
    """Run ``script OUT`` on ``world`` ranks; skip without gloo, fail on a non-zero exit or after ``timeout_s``
    (a hung collective fails the test instead of blocking the run)."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {timeout_s} s: {(err.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}"
