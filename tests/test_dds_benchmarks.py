"""The RRR grid machinery at a small size (the full grid runs from the command line)."""

import json

import pytest
import torch

from gaugeopt.dds import rrr_lambda
from gaugeopt.dds.benchmarks import half_squared_error, main, rrr_benchmark, rrr_checkpoint


def test_rrr_checkpoint_is_a_least_squares_minimum():
    model, x, y = rrr_checkpoint(10, 5, 3, 2, samples=200, noise=1.0, seed=0)
    loss = half_squared_error(model(x), y).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-10
    # balanced factors: A A^T = B^T B
    torch.testing.assert_close(model.A.weight @ model.A.weight.T, model.B.weight.T @ model.B.weight)


def test_rrr_benchmark_without_llc():
    result = rrr_benchmark(widths=(2, 3), run_llc=False, samples=200, dds_repeats=1)
    cells = result["cells"]
    assert [(c["H"], c["r"]) for c in cells] == [(2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
    for cell in cells:
        assert cell["lambda"] == rrr_lambda(M=10, N=5, H=cell["H"], r=cell["r"])
        assert cell["dds"]["B:output"]["rank_A"] == cell["H"]  # predictions span H directions
        assert cell["dds"]["A:output"]["width"] == cell["H"]
        assert cell["dds_forward_backward_passes"] == 1
    assert {e["observable"] for e in result["spearman_with_lambda"]} >= {"logdet_G", "lambda_min_G"}
    json.dumps(result)


def test_command_line_writes_json(tmp_path):
    out = tmp_path / "grid.json"
    with pytest.raises(SystemExit):
        main(["nonsense", "--out", str(out)])
    assert main(["rrr", "--no-llc", "--quiet", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["cells"]) == 14 and data["environment"]["command"].startswith("python -m")
