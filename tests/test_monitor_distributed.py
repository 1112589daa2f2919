"""The monitor under DDP and FSDP2 (2 gloo ranks on CPU, float64): every rank calls ``step()``, rank 0 alone
logs, nothing hangs, and rank 0's readings equal those of the same training in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import monitor_distributed_worker as worker  # noqa: E402
from torchrun import torchrun  # noqa: E402

WORLD = 2
LAUNCH_TIMEOUT_S = 300  # a hang fails the test instead of blocking the run


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> list[dict]:
    """Run the worker once under torchrun; every rank's results."""
    out = tmp_path_factory.mktemp("monitor_distributed")
    torchrun(worker.__file__, out, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
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
