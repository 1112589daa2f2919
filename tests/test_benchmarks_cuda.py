"""benchmarks/cuda.py, the prepared GPU benchmark, runs end to end on the CPU at toy size."""

import json

import pytest
import torch

from benchmarks import cuda as cuda_benchmark


def test_cuda_benchmark_writes_its_table_on_any_device(tmp_path):
    peers = ["AdamW (foreach)", "AdamW (fused)", "Muon+AdamW (torch)", "DDCAdam", "DDCMuon"]
    code = cuda_benchmark.main(["--device", "cpu", "--widths", "32", "--layers", "2", "--dtypes", "float32",
                                "bfloat16", "--warmup", "1", "--rounds", "2", "--out", str(tmp_path),
                                "--peers", *peers])
    assert code == 0
    results = json.loads((tmp_path / "benchmarks_cuda.json").read_text())
    assert [(p["width"], p["dtype"]) for p in results["points"]] == [(32, "float32"), (32, "bfloat16")]
    for point in results["points"]:
        assert point["families"] > 0 and point["discovery_s"] > 0
        assert list(point["optimizers"]) == peers
        for timing in point["optimizers"].values():
            assert len(timing["step_s"]) == 2 and timing["median_s"] > 0 and timing["state_bytes"] > 0
            assert timing["peak_step_bytes"] is None  # measured on CUDA only
    table = (tmp_path / "benchmarks_cuda.md").read_text()
    assert "d_model 32 x 2 layers, bfloat16 parameters" in table and "| DDCMuon |" in table


def test_cuda_benchmark_refuses_a_missing_device_and_a_missing_baseline(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert cuda_benchmark.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cuda_benchmark.main(["--device", "cpu", "--peers", "DDCAdam", "--out", str(tmp_path)])
    assert not (tmp_path / "benchmarks_cuda.json").exists()
