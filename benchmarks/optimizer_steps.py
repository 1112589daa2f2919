"""Optimizer step time and state memory on the reference language model, against the peers.

Every comparison builds one :class:`~gaugeopt.models.TransformerLM` (float32), computes one set of
gradients, and gives each optimizer its own copy of the model holding those gradients. Steps are then
timed *interleaved* (one step of each optimizer per round, ``rounds`` rounds after ``warmup`` untimed
ones), so a change in machine load hits every optimizer alike; the report gives medians over rounds and
the ratio of the medians. The gradients stay fixed: the step's cost does not depend on their values.

On the CPU a step's temporaries come from glibc's ``malloc``, whose defaults adapt to the process's
history: after some pattern of frees it returns memory to the kernel at every step, and the next step
page-faults it back in (the kernel zeroes each page), so one optimizer's timings depend on which
others ran in the same process. :func:`keep_freed_memory` fixes the two thresholds involved, so
freed memory is reused as a caching allocator would (torch's CUDA allocator does on a GPU); every
timed step also records its minor page faults, which show whether the allocator took part.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import gaugeopt
from gaugeopt.gauges import GaugeSet
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim.baselines import MuonWithAdamW
from gaugeopt.optim.ddc_adam import DDCAdam
from gaugeopt.optim.ddc_muon import DDCMuon, muon_parameter_names
from gaugeopt.optim.symcompat import SymmetryCompatible, symmetry_param_groups

try:
    import resource
except ImportError:  # not on Unix: no page-fault counts
    resource = None

VOCAB, SEQ, BATCH = 256, 64, 4
LR, ADAM_LR, WEIGHT_DECAY = 0.02, 1e-3, 0.1

OptimizerFactory = Callable[[nn.Module, GaugeSet], object]


def reference_config(width: int, n_layers: int = 2, vocab: int = VOCAB) -> TransformerLMConfig:
    """The reference LM at ``d_model = width``: heads of 32 dims, ``d_ff = 4 width``, RoPE, RMSNorm,
    SwiGLU (the defaults of :class:`TransformerLMConfig`), a vocabulary of ``vocab`` tokens."""
    return TransformerLMConfig(vocab_size=vocab, d_model=width, n_layers=n_layers, n_heads=max(1, width // 32),
                               d_ff=4 * width, max_seq_len=SEQ)


def reference_tokens(vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """The batch of the reference loss: ``BATCH`` sequences of ``SEQ + 1`` tokens."""
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``model``'s next-token logits on ``tokens``."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def model_with_gradients(width: int, seed: int = 0, device: str | torch.device = "cpu", n_layers: int = 2,
                         vocab: int = VOCAB) -> tuple[nn.Module, GaugeSet]:
    """The reference LM (float32, on ``device``) with the gradients of one next-token loss on
    :func:`reference_tokens`, and its gauges."""
    torch.manual_seed(seed)
    model = TransformerLM(reference_config(width, n_layers=n_layers, vocab=vocab))
    tokens = reference_tokens(vocab, seed)
    gauges = gaugeopt.find_gauges(model, tokens[:1, :16], output="logits")
    model.to(device)  # in place: the gauges stay bound to it
    next_token_loss(model, tokens.to(device)).backward()
    return model, gauges


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(optimizer) -> int:
    """Bytes held in tensors of the optimizer's state (every sub-optimizer's, for a wrapper)."""
    optimizers = getattr(optimizer, "optimizers", (optimizer,))
    return sum(value.numel() * value.element_size() for opt in optimizers for state in opt.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


@dataclass
class StepTiming:
    name: str
    step_s: list[float]
    state_bytes: int
    first_step_s: float  # the first (untimed) step: state allocation, and compilation for a compiled step
    peak_step_bytes: int | None = None  # CUDA: the most a timed step allocated above what it found allocated
    page_faults: list[int] | None = None  # minor page faults of the process during each timed step (Unix)

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


#: glibc's ``mallopt`` parameters (malloc.h) and the values :func:`keep_freed_memory` gives them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD, MMAP_THRESHOLD = 2**30, 2**25  # 1 GiB of free heap kept; 32 MiB: glibc's largest mmap threshold


def keep_freed_memory() -> str | None:
    """Make glibc's ``malloc`` keep freed memory for reuse in this process: a fixed mmap threshold
    (blocks below 32 MiB come from the heap; glibc's default moves it with each large free) and a trim
    threshold of 1 GiB (glibc's default gives the heap's free top back to the kernel past twice the
    mmap threshold). Returns what was set, or None where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    if not (mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
        return None
    return f"glibc mallopt: M_TRIM_THRESHOLD {TRIM_THRESHOLD >> 20} MiB, M_MMAP_THRESHOLD {MMAP_THRESHOLD >> 20} MiB"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_steps(model: nn.Module, gauges: GaugeSet, factories: dict[str, OptimizerFactory], *, warmup: int,
               rounds: int) -> dict[str, StepTiming]:
    """Interleaved step timings of each optimizer on its own copy of ``model`` (same gradients); on
    CUDA also each optimizer's peak transient memory over its timed steps."""
    runs = {}
    for name, make in factories.items():
        twin = copy.deepcopy(model)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        runs[name] = make(twin, gauges.bind(twin))
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def timed_step(optimizer) -> tuple[float, int | None, int]:
        sync()
        if cuda:
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        faults = _minor_faults()
        start = time.perf_counter()
        optimizer.step()
        sync()
        elapsed = time.perf_counter() - start
        faults = _minor_faults() - faults
        return elapsed, (torch.cuda.max_memory_allocated(device) - before if cuda else None), faults

    first: dict[str, float] = {}
    for _ in range(warmup):
        for name, optimizer in runs.items():
            first.setdefault(name, timed_step(optimizer)[0])
    times: dict[str, list[float]] = {name: [] for name in runs}
    faults: dict[str, list[int]] = {name: [] for name in runs}
    peaks: dict[str, int | None] = {name: None for name in runs}
    for _ in range(rounds):
        for name, optimizer in runs.items():
            elapsed, peak, step_faults = timed_step(optimizer)
            times[name].append(elapsed)
            faults[name].append(step_faults)
            if peak is not None:
                peaks[name] = max(peak, peaks[name] or 0)
    return {name: StepTiming(name, times[name], state_bytes(runs[name]), first.get(name, float("nan")), peaks[name],
                             faults[name] if resource is not None else None)
            for name in runs}


# --------------------------------------------------------------------------------------------------
# The optimizers compared
# --------------------------------------------------------------------------------------------------


def adamw(model: nn.Module, gauges: GaugeSet):
    return torch.optim.AdamW(model.parameters(), lr=ADAM_LR, weight_decay=WEIGHT_DECAY, foreach=True)


def adamw_fused(model: nn.Module, gauges: GaugeSet):
    """torch's single-kernel AdamW (``fused=True``), the fastest peer where torch has it (CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=ADAM_LR, weight_decay=WEIGHT_DECAY, fused=True)


def ddc_adam(model: nn.Module, gauges: GaugeSet):
    return DDCAdam(model.parameters(), gauges, lr=ADAM_LR, weight_decay=WEIGHT_DECAY)


def ddc_adam_stacked(model: nn.Module, gauges: GaugeSet):
    """DDCAdam with ``stack_parameters=True`` (every batch's parameters and gradients held in one buffer)."""
    return DDCAdam(model.parameters(), gauges, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, stack_parameters=True)


def ddc_adam_compiled(model: nn.Module, gauges: GaugeSet):
    """DDCAdam with its step compiled by ``torch.compile`` (``compiled=True``): the same step program,
    traced once; the first step pays the compilation."""
    return DDCAdam(model.parameters(), gauges, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, compiled=True)


def ddc_adam_compiled_stacked(model: nn.Module, gauges: GaugeSet):
    """DDCAdam with ``compiled=True`` and ``stack_parameters=True``: one graph input per batch."""
    return DDCAdam(model.parameters(), gauges, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, compiled=True,
                   stack_parameters=True)


def ddc_adam_cuda_graphs(model: nn.Module, gauges: GaugeSet):
    """DDCAdam with ``compiled="reduce-overhead"`` and ``stack_parameters=True``: on a CUDA device each
    phase of the step is replayed as a CUDA graph."""
    return DDCAdam(model.parameters(), gauges, lr=ADAM_LR, weight_decay=WEIGHT_DECAY, compiled="reduce-overhead",
                   stack_parameters=True)


class CompiledAdamW:
    """``torch.optim.AdamW(foreach=True)`` whose ``step`` runs under ``torch.compile`` (torch's recipe for
    a compiled optimizer step: the step called inside a compiled function)."""

    def __init__(self, model: nn.Module, gauges: GaugeSet):
        self.optimizer = adamw(model, gauges)
        self.state = self.optimizer.state
        self.step = torch.compile(self.optimizer.step, fullgraph=False)


def muon_with_adamw_torch(model: nn.Module, gauges: GaugeSet):
    """``torch.optim.Muon`` (Newton-Schulz in bfloat16, hard-coded by torch) + ``AdamW``."""
    return MuonWithAdamW(model, gauges, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR)


def muon_with_adamw_reference(ns_dtype: torch.dtype | None):
    """Muon + AdamW with the same parameter split, without gauge frames, Newton-Schulz in ``ns_dtype``
    (``None``: the parameters' dtype): torch.optim.Muon's iteration operation for operation (bit for
    bit torch's in bfloat16, tests/test_ddc_muon.py), in a dtype torch's Muon does not offer."""
    def make(model: nn.Module, gauges: GaugeSet):
        hidden = muon_parameter_names(model, gauges)
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if n in hidden], "use_muon": True},
                  {"params": [p for n, p in named if n not in hidden], "use_muon": False}]
        return DDCMuon(groups, None, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR, ns_dtype=ns_dtype)
    return make


def ddc_muon(ns_dtype: torch.dtype | None = torch.bfloat16, stack_parameters: bool = False):
    """DDCMuon with Newton-Schulz in ``ns_dtype`` (default: bfloat16, DDCMuon's default and torch's)."""
    def make(model: nn.Module, gauges: GaugeSet):
        return DDCMuon(model.parameters(), gauges, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR,
                       ns_dtype=ns_dtype, stack_parameters=stack_parameters)
    return make


def ddc_muon_compiled(model: nn.Module, gauges: GaugeSet):
    """DDCMuon at its defaults (Newton-Schulz in bfloat16) with ``compiled=True``."""
    return DDCMuon(model.parameters(), gauges, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR, compiled=True)


def ddc_muon_compiled_stacked(model: nn.Module, gauges: GaugeSet):
    """DDCMuon with ``compiled=True`` and ``stack_parameters=True``."""
    return DDCMuon(model.parameters(), gauges, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR, compiled=True,
                   stack_parameters=True)


def ddc_muon_cuda_graphs(model: nn.Module, gauges: GaugeSet):
    """DDCMuon with ``compiled="reduce-overhead"`` and ``stack_parameters=True`` (CUDA graphs on a GPU)."""
    return DDCMuon(model.parameters(), gauges, lr=LR, weight_decay=WEIGHT_DECAY, adam_lr=ADAM_LR,
                   compiled="reduce-overhead", stack_parameters=True)


def symmetry_compatible(model: nn.Module, gauges: GaugeSet):
    return SymmetryCompatible(symmetry_param_groups(model, verbose=False), weight_decay=WEIGHT_DECAY)


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------


def compare(width: int, factories: dict[str, OptimizerFactory], *, warmup: int, rounds: int,
            device: str = "cpu", n_layers: int = 2) -> dict:
    """One side-by-side comparison at one width, as a JSON-ready dict."""
    model, gauges = model_with_gradients(width, device=device, n_layers=n_layers)
    timings = time_steps(model, gauges, factories, warmup=warmup, rounds=rounds)
    return {"width": width, "layers": n_layers, "parameters": parameter_count(model),
            "optimizers": {name: {"median_s": t.median_s, "step_s": t.step_s, "state_bytes": t.state_bytes,
                                  "first_step_s": t.first_step_s, "page_faults": t.page_faults}
                           for name, t in timings.items()}}
