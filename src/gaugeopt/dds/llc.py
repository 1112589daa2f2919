"""The local learning coefficient (LLC) baseline, estimated by SGLD with the real ``devinterp``.

``devinterp`` (>= 2.0) is an optional dependency: ``pip install gaugeopt[llc]``. Its ``llc()``
samples a localised tempered posterior around the checkpoint ``w*`` with SGLD and returns

    LLC = n_beta * (E_sgld[L(w)] - L(w*)),

where ``L`` is the mean per-sample loss (for an LLC it must be a negative log-likelihood, e.g.
``||y - f(x)||^2 / (2 sigma^2)`` for Gaussian noise of variance sigma^2).

devinterp 2 speaks the language-model protocol: a Hugging Face ``Dataset`` with an ``input_ids``
column and a ``loss_fn(model, input_ids) -> (batch, seq_len - 1)`` per-token loss. For a
supervised data set ``(inputs, targets)`` of n samples, :func:`estimate_llc` stores each sample's
index as a two-token sequence ``[i, i]`` and its loss function looks the sample up by index, so
each "sequence" carries exactly one per-sample loss. The sampler itself is devinterp's, untouched.

Cost accounting: every SGLD step is one forward-backward pass on ``batch_size`` samples; the
initial loss costs ``num_chains * num_init_loss_batches`` forward passes.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .capture import PerSampleLoss

INSTALL_HINT = "the LLC baseline needs devinterp: pip install gaugeopt[llc]"


def _require_devinterp() -> Any:
    try:
        from devinterp.slt.llc import llc
        import datasets
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return llc, datasets


def default_n_beta(samples: int) -> float:
    """``n / log n``: the inverse temperature of WBIC (beta = 1 / log n) times n."""
    if samples < 2:
        raise ValueError(f"n_beta = n / log n needs n >= 2, got {samples}")
    return samples / math.log(samples)


@dataclass(frozen=True)
class LLCEstimate:
    """An LLC estimate with its settings and cost."""

    llc_mean: float
    llc_std: float  # across chains
    llc_per_chain: tuple[float, ...]
    init_loss: float
    lr: float
    n_beta: float
    localization: float
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    batch_size: int
    sgld_steps: int  # per chain, burn-in included
    forward_backward_passes: int  # all chains, on batch_size samples each
    forward_passes: int  # initial-loss evaluation
    samples_processed: int  # forward-backward passes * batch_size
    wall_time_s: float
    loss_trace: tuple[tuple[float, ...], ...]  # (chain, step) mean loss

    def as_dict(self, include_trace: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_trace:
            data.pop("loss_trace")
        return data


def estimate_llc(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss: PerSampleLoss,
    lr: float,
    localization: float,
    n_beta: float | None = None,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    batch_size: int = 100,
    num_init_loss_batches: int = 8,
    seed: int = 0,
    device: str = "cpu",
    output_dir: str | Path | None = None,
) -> LLCEstimate:
    """Estimate the LLC of ``model`` at its current parameters on ``(inputs, targets)``.

    Args:
        model: the checkpoint; it is copied by devinterp and left unchanged.
        inputs, targets: the n training samples (first dimension indexes samples).
        loss: ``loss(model(inputs[idx]), targets[idx])`` -> per-sample negative log-likelihoods.
        lr: SGLD step size epsilon. localization: strength gamma of the pull towards ``w*``.
        n_beta: inverse temperature; default ``n / log n`` with n the number of samples.
        num_chains, num_draws, num_burnin_steps, batch_size, num_init_loss_batches, seed:
            devinterp's sampler settings (devinterp averages the loss over every step, burn-in
            included).
        output_dir: where devinterp writes its zarr store (a temporary directory by default).
    """
    devinterp_llc, datasets = _require_devinterp()
    samples = int(inputs.shape[0])
    if targets.shape[0] != samples:
        raise ValueError(f"inputs have {samples} samples but targets have {targets.shape[0]}")
    if not 1 <= batch_size <= samples:
        raise ValueError(f"batch_size must lie in [1, {samples}], got {batch_size}")
    if lr <= 0 or localization < 0:
        raise ValueError(f"need lr > 0 and localization >= 0, got lr={lr}, "
                         f"localization={localization}")
    n_beta = default_n_beta(samples) if n_beta is None else float(n_beta)

    index_dataset = datasets.Dataset.from_dict(
        {"input_ids": [[i, i] for i in range(samples)]}
    ).with_format("torch")

    def per_sample_nll(sampled_model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        index = input_ids[:, 0].to(inputs.device)
        values = loss(sampled_model(inputs[index]), targets[index])
        if values.shape != (index.numel(),):
            raise ValueError("loss must return one value per sample, got shape "
                             f"{tuple(values.shape)}")
        return values.unsqueeze(1)

    with tempfile.TemporaryDirectory(dir=output_dir) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        result = devinterp_llc(
            model, index_dataset, {}, lr=lr, n_beta=n_beta, loss_fn=per_sample_nll,
            localization=localization, num_chains=num_chains, num_draws=num_draws,
            num_burnin_steps=num_burnin_steps, batch_size=batch_size,
            num_init_loss_batches=num_init_loss_batches, init_seed=seed,
            device=device, output_path=Path(scratch) / "samples.zarr",
        )
        per_chain = tuple(float(v) for v in result["llc_per_chain"].values)
        trace = tuple(tuple(float(v) for v in row) for row in result["loss_trace"].values)
        wall = time.perf_counter() - start
        llc_mean, llc_std = float(result["llc_mean"]), float(result["llc_std"])
        init_loss = float(result["init_loss"])

    steps = num_draws + num_burnin_steps
    return LLCEstimate(
        llc_mean=llc_mean, llc_std=llc_std, llc_per_chain=per_chain, init_loss=init_loss,
        lr=lr, n_beta=n_beta, localization=localization, num_chains=num_chains,
        num_draws=num_draws, num_burnin_steps=num_burnin_steps, batch_size=batch_size,
        sgld_steps=steps, forward_backward_passes=num_chains * steps,
        forward_passes=num_chains * num_init_loss_batches,
        samples_processed=num_chains * steps * batch_size, wall_time_s=wall, loss_trace=trace,
    )
