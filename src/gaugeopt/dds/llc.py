"""The local learning coefficient (LLC) baseline, estimated by SGLD with the real ``devinterp``.

``devinterp`` (>= 2.0) is an optional dependency: ``pip install gaugeopt[llc]``. Its sampler draws
from the localised tempered posterior around the checkpoint ``w*``

    p(w) ~ exp(-n_beta L(w) - (gamma / 2) |w - w*|^2)

with SGLD, where ``L`` is the mean per-sample loss (a negative log-likelihood, e.g.
``||y - f(x)||^2 / (2 sigma^2)`` for Gaussian noise of variance sigma^2). The estimate is

    LLC = n_beta * (E_draws[L(w)] - L_n(w*)).

How this module follows devinterp's own guidance (its documentation and the LLC papers it cites):

* **burn-in excluded.** devinterp 2's ``llc()`` averages the loss over *every* SGLD step, burn-in
  included. Here each chain's first ``num_burnin_steps`` losses are dropped and the estimate is
  taken over the draws only, from devinterp's recorded loss trace.
* **several chains.** ``num_chains`` independent chains (4 by default); the spread across chains
  gives a standard error.
* **full-batch gradients** by default (``batch_size=None``). A minibatch adds gradient noise that
  SGLD does not account for and raises the estimate (no correction for it is applied here; pass
  ``batch_size`` only knowingly, and the estimate records which was used).
* **the initial loss on all n samples**, ``L_n(w*)``, evaluated here in float64 in the sampler's
  (training) mode rather than on devinterp's few shuffled batches.
* **step-size insensitivity** is checked by :func:`scan_step_sizes`: estimates at step sizes a
  factor 2 apart, and the chosen step is the middle of the 4x range where they agree best.

devinterp 2 speaks the language-model protocol: a Hugging Face ``Dataset`` with an ``input_ids``
column and a ``loss_fn(model, input_ids) -> (batch, seq_len - 1)`` per-token loss. For a
supervised data set ``(inputs, targets)`` of n samples, :func:`estimate_llc` stores each sample's
index as a two-token sequence ``[i, i]`` and its loss function looks the sample up by index, so
each "sequence" carries exactly one per-sample loss. The sampler itself is devinterp's, untouched.

Cost accounting: every SGLD step (burn-in included) is one forward-backward pass on
``batch_size`` samples; the initial loss is one forward pass on all n.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
    """An LLC estimate over the post-burn-in draws, with its settings, diagnostics and cost."""

    llc_mean: float  # mean over chains
    llc_std: float  # sample standard deviation across chains
    llc_stderr: float  # llc_std / sqrt(num_chains)
    llc_per_chain: tuple[float, ...]
    llc_first_half: float  # from the first half of the draws (all chains): an equilibration check
    llc_second_half: float  # from the second half
    init_loss: float  # L_n(w*) on all n samples
    lr: float
    n_beta: float
    localization: float
    num_chains: int
    num_draws: int
    num_burnin_steps: int
    batch_size: int
    full_batch: bool
    sgld_steps: int  # per chain, burn-in included
    forward_backward_passes: int  # all chains, on batch_size samples each
    samples_processed: int  # forward-backward passes * batch_size
    wall_time_s: float
    loss_trace: tuple[tuple[float, ...], ...]  # (chain, step) mean loss, burn-in included

    @property
    def loss_excess(self) -> float:
        """``max over chains of E_draws[L] - L_n(w*)``: how far the chains moved up the loss (nats).

        A chain that leaves the basin of ``w*`` reads the loss of somewhere else; the locality check
        of :func:`scan_localization` bounds this number."""
        return max(self.llc_per_chain) / self.n_beta

    @property
    def equilibration_drift(self) -> float:
        """``|second half - first half|`` of the draws, relative to the estimate."""
        return abs(self.llc_second_half - self.llc_first_half) / max(abs(self.llc_mean), 1e-300)

    def as_dict(self, include_trace: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["equilibration_drift"] = self.equilibration_drift
        data["loss_excess"] = self.loss_excess
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
    num_draws: int = 1000,
    num_burnin_steps: int = 1000,
    batch_size: int | None = None,
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
        n_beta: inverse temperature times n; default ``n / log n``.
        num_chains, num_draws, num_burnin_steps: chains, and steps per chain kept and dropped.
        batch_size: samples per SGLD gradient; None (default) is full batch (all n).
        seed: devinterp's ``init_seed`` (chain c uses ``seed + c``).
        output_dir: where devinterp writes its zarr store (a temporary directory by default).
    """
    devinterp_llc, datasets = _require_devinterp()
    samples = int(inputs.shape[0])
    if targets.shape[0] != samples:
        raise ValueError(f"inputs have {samples} samples but targets have {targets.shape[0]}")
    batch_size = samples if batch_size is None else int(batch_size)
    if not 1 <= batch_size <= samples:
        raise ValueError(f"batch_size must lie in [1, {samples}], got {batch_size}")
    if lr <= 0 or localization < 0:
        raise ValueError(f"need lr > 0 and localization >= 0, got lr={lr}, "
                         f"localization={localization}")
    if num_chains < 1 or num_draws < 2 or num_burnin_steps < 0:
        raise ValueError(f"need num_chains >= 1, num_draws >= 2, num_burnin_steps >= 0, got "
                         f"{num_chains}, {num_draws}, {num_burnin_steps}")
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

    init_loss = full_data_loss(model, inputs, targets, loss)
    with tempfile.TemporaryDirectory(dir=output_dir) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        result = devinterp_llc(
            model, index_dataset, {}, lr=lr, n_beta=n_beta, loss_fn=per_sample_nll,
            localization=localization, num_chains=num_chains, num_draws=num_draws,
            num_burnin_steps=num_burnin_steps, batch_size=batch_size,
            num_init_loss_batches=1, init_seed=seed,
            device=device, output_path=Path(scratch) / "samples.zarr",
        )
        trace = np.asarray(result["loss_trace"].values, dtype=np.float64)
        wall = time.perf_counter() - start
    steps = num_draws + num_burnin_steps
    if trace.shape != (num_chains, steps) or not np.isfinite(trace).all():
        raise RuntimeError(f"SGLD diverged or a chain failed (loss trace of shape {trace.shape}, "
                           f"expected {(num_chains, steps)}, finite: {bool(np.isfinite(trace).all())}); "
                           f"lower the step size lr={lr}")
    draws = trace[:, num_burnin_steps:]
    per_chain = n_beta * (draws.mean(axis=1) - init_loss)
    half = num_draws // 2
    llc_std = float(per_chain.std(ddof=1)) if num_chains > 1 else math.nan
    return LLCEstimate(
        llc_mean=float(per_chain.mean()), llc_std=llc_std,
        llc_stderr=llc_std / math.sqrt(num_chains) if num_chains > 1 else math.nan,
        llc_per_chain=tuple(float(v) for v in per_chain),
        llc_first_half=float(n_beta * (draws[:, :half].mean() - init_loss)),
        llc_second_half=float(n_beta * (draws[:, half:].mean() - init_loss)),
        init_loss=init_loss, lr=lr, n_beta=n_beta, localization=localization,
        num_chains=num_chains, num_draws=num_draws, num_burnin_steps=num_burnin_steps,
        batch_size=batch_size, full_batch=batch_size == samples, sgld_steps=steps,
        forward_backward_passes=num_chains * steps,
        samples_processed=num_chains * steps * batch_size, wall_time_s=wall,
        loss_trace=tuple(tuple(float(v) for v in row) for row in trace),
    )


def full_data_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   loss: PerSampleLoss) -> float:
    """``L_n(w)``: the mean per-sample loss on all n samples, in float64, in training mode (the
    mode devinterp samples in); the model's mode is restored."""
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            return float(loss(model(inputs), targets).to(torch.float64).mean())
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class StepSizeScan:
    """LLC estimates at step sizes a factor 2 apart and the step chosen where they agree.

    ``spread`` of a window of three consecutive step sizes (a 4x range) is ``(max - min) / mean``
    of its estimates; the chosen step is the middle of the window with the smallest spread among
    those whose estimates are all positive and equilibrated; ``insensitive`` says whether that
    spread is within ``tolerance``.
    """

    step_sizes: tuple[float, ...]
    estimates: tuple[LLCEstimate, ...]
    chosen_lr: float
    chosen: LLCEstimate
    window: tuple[float, float]  # the 4x range around the chosen step
    spread: float
    insensitive: bool
    tolerance: float
    rule: str

    def as_dict(self) -> dict[str, Any]:
        return {"step_sizes": list(self.step_sizes),
                "llc": [e.llc_mean for e in self.estimates],
                "llc_stderr": [e.llc_stderr for e in self.estimates],
                "equilibration_drift": [e.equilibration_drift for e in self.estimates],
                "chosen_lr": self.chosen_lr, "chosen_llc": self.chosen.llc_mean,
                "window": list(self.window), "spread": self.spread, "insensitive": self.insensitive,
                "tolerance": self.tolerance, "rule": self.rule,
                "wall_time_s": sum(e.wall_time_s for e in self.estimates),
                "forward_backward_passes": sum(e.forward_backward_passes for e in self.estimates)}


def scan_step_sizes(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                    loss: PerSampleLoss, step_sizes: Sequence[float], localization: float,
                    tolerance: float = 0.10, **sampler: Any) -> StepSizeScan:
    """Estimate the LLC at each step size and choose the one where a 4x range of them agrees.

    ``step_sizes`` must be increasing, a factor 2 apart, at least three of them. A window (three
    consecutive steps) is admissible when its three estimates are positive and equilibrated
    (first and second half of the draws within ``tolerance`` of the estimate). The chosen step is
    the middle of the admissible window with the smallest spread; when no window is admissible the
    smallest spread overall is taken and ``rule`` says so. Nothing here looks at a true lambda.
    ``sampler`` goes to :func:`estimate_llc` (chains, draws, burn-in, batch size, seed, ...).
    """
    steps = [float(s) for s in step_sizes]
    if len(steps) < 3 or any(not math.isclose(b / a, 2.0, rel_tol=1e-9) for a, b in zip(steps, steps[1:])):
        raise ValueError(f"step_sizes must be at least three values, each twice the previous, got {steps}")
    estimates = [estimate_llc(model, inputs, targets, loss=loss, lr=lr, localization=localization, **sampler)
                 for lr in steps]

    def spread(i: int) -> float:
        values = [e.llc_mean for e in estimates[i - 1:i + 2]]
        return (max(values) - min(values)) / abs(float(np.mean(values))) if np.mean(values) != 0 else math.inf

    def admissible(i: int) -> bool:
        return all(e.llc_mean > 0 and e.equilibration_drift <= tolerance for e in estimates[i - 1:i + 2])

    middles = range(1, len(steps) - 1)
    candidates = [i for i in middles if admissible(i)]
    if candidates:
        chosen = min(candidates, key=spread)
        rule = ("middle of the 4x step range whose estimates agree best, among ranges whose estimates "
                "are positive and equilibrated")
    else:
        chosen = min(middles, key=spread)
        rule = ("NO 4x step range had positive, equilibrated estimates; chose the smallest spread anyway "
                "(lengthen the chains or move the step range)")
    return StepSizeScan(step_sizes=tuple(steps), estimates=tuple(estimates), chosen_lr=steps[chosen],
                        chosen=estimates[chosen], window=(steps[chosen - 1], steps[chosen + 1]),
                        spread=spread(chosen), insensitive=bool(candidates) and spread(chosen) <= tolerance,
                        tolerance=tolerance, rule=rule)


@dataclass(frozen=True)
class LocalizationScan:
    """The localisation scan before an LLC is read: short SGLD runs over (step size, strength) pairs.

    ``tried`` lists every pair run, in order, with its :attr:`LLCEstimate.loss_excess` (inf when a
    chain diverged); ``chosen`` is the first pair whose excess is at most ``max_excess``, or None (the
    LLC is then not read).
    """

    tried: tuple[tuple[float, float, float], ...]  # (lr, localization, loss excess)
    max_excess: float
    chosen: tuple[float, float] | None  # (lr, localization)
    wall_time_s: float
    forward_backward_passes: int

    @property
    def least_excess(self) -> float:
        return min(excess for _, _, excess in self.tried)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "least_excess": self.least_excess}


def scan_localization(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, loss: PerSampleLoss,
                      step_sizes: Sequence[float], localizations: Sequence[float], max_excess: float,
                      **sampler: Any) -> LocalizationScan:
    """Find the largest step size, then the weakest localization, at which SGLD stays local.

    For each step size in ``step_sizes`` (decreasing) and each strength in ``localizations``
    (increasing) with ``lr * localization < 4`` (SGLD's pull is unstable beyond), a short run is made
    and the first pair whose every chain keeps ``E_draws[L] - L_n(w*) <= max_excess`` is chosen: a
    larger step mixes faster and a weaker pull biases the estimate less, but a chain that climbs
    more than ``max_excess`` above the checkpoint's loss is measuring another region (or diverging
    along a direction sharper than the step allows). ``sampler`` goes to :func:`estimate_llc`
    (chains, draws, burn-in, seed, ...); the estimates themselves are never looked at.
    """
    lrs, gammas = [float(v) for v in step_sizes], [float(g) for g in localizations]
    if not lrs or any(b >= a for a, b in zip(lrs, lrs[1:])) or lrs[-1] <= 0:
        raise ValueError(f"step_sizes must be positive and decreasing, got {lrs}")
    if not gammas or any(b <= a for a, b in zip(gammas, gammas[1:])) or gammas[0] <= 0:
        raise ValueError(f"localizations must be positive and increasing, got {gammas}")
    if max_excess <= 0:
        raise ValueError(f"max_excess must be positive, got {max_excess}")
    tried, seconds, passes = [], 0.0, 0
    for lr in lrs:
        for gamma in (g for g in gammas if lr * g < 4.0):
            try:
                estimate = estimate_llc(model, inputs, targets, loss=loss, lr=lr, localization=gamma, **sampler)
            except RuntimeError:  # a chain diverged: certainly not local
                tried.append((lr, gamma, math.inf))
                continue
            seconds += estimate.wall_time_s
            passes += estimate.forward_backward_passes
            tried.append((lr, gamma, estimate.loss_excess))
            if estimate.loss_excess <= max_excess:
                return LocalizationScan(tuple(tried), float(max_excess), (lr, gamma), seconds, passes)
    return LocalizationScan(tuple(tried), float(max_excess), None, seconds, passes)
