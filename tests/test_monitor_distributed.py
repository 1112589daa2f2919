"""The monitor under DDP and FSDP2 (2 gloo ranks on CPU, float64): every rank calls ``step()``, rank 0 alone
logs, nothing hangs, and rank 0's readings equal those of the same training in one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import monitor_distributed_worker as worker  # noqa: E402

WORLD = 2
LAUNCH_TIMEOUT_S = 300  # a hang fails the test instead of blocking the run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> list[dict]:
    """Run the worker once under torchrun; every rank's results."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("monitor_distributed")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
               "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(Path(worker.__file__)), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s: {(err.stderr or b'')[-3000:]!r}")
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict]:
    return {label: worker.monitored_run(label, lambda model: model) for label in worker.OPTIMIZERS}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_rank_zero_reads_what_one_process_reads(launched, single_process, parallel, label):
    ours, reference = launched[0][f"{parallel}_{label}"], single_process[label]
    steps = [step for step, _ in reference["logged"]]
    assert steps == [2, 4, 6, 8, 10] and [step for step, _ in ours["logged"]] == steps
    assert ours["returned"] == reference["returned"] and ours["table_rows"] == 5
    for (step, found), (_, expected) in zip(ours["logged"], reference["logged"]):
        assert found.keys() == expected.keys()
        assert sum(tag.startswith("dds/") for tag in found) >= 4 and "grad_norm/gauge_invariant" in found
        for tag, value in expected.items():  # the same training up to the rounding of sums over ranks
            assert found[tag] == pytest.approx(value, rel=1e-8, abs=1e-12), (step, tag)  # measured: 5e-10
    drift = reference["logged"][-1][1]["gauge_drift/norm_scale:norm"]
    if label == "adamw":
        assert drift > 1e-2  # a drift that moved: its parity means something
    else:
        assert reference["logged"][-1][1]["frozen_units/total"] == 1.0  # the dead unit, frozen on every path


@pytest.mark.parametrize("run", ["ddp_adamw", "fsdp_adamw", "ddp_ddc_adam", "fsdp_ddc_adam"])
def test_other_ranks_take_part_without_logging(launched, run):
    other = launched[1][run]
    assert other["logged"] == [] and not any(other["returned"]) and other["table_rows"] == 0
