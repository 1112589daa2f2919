"""The Hugging Face ``Trainer`` with ``gaugeopt.integrations.hf.optimizer_cls_and_kwargs``: a real
tiny Llama (random weights) trained by a real Trainer, skipped without the ``hf`` extra.

* The property: two Trainer runs, from ``theta`` and from ``g . theta``, with DDCAdam from the factory
  and its gauge-invariant clipping active on every step, end ``g``-related to float64 rounding; with
  the Trainer's own clipping instead they do not (nor does the Trainer's default AdamW).
* What the factory builds: DDCMuon with the Muon/Adam split, no decay for vectors, the Trainer's
  schedule on both rules, gauges bound to the Trainer's model; bad arguments refused up front.
* The example script runs.

FSDP2 through the Trainer cannot run here: accelerate 1.15 turns FSDP on only for GPU-like backends.
On 2 gloo CPU ranks ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2}, use_cpu=True)``
trains under DDP without a word (``trainer.is_fsdp_enabled`` is False, ``distributed_type`` is
``MULTI_CPU``, the model is wrapped in ``DistributedDataParallel``), and
``Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))`` drops the
plugin (``accelerator.state.fsdp_plugin`` raises ``AttributeError``): ``AcceleratorState`` sets
``DistributedType.FSDP`` only in its branch for MULTI_GPU/NPU/XPU/HPU/MLU/SDAA/MUSA/NEURON. What
accelerate does to an optimizer under FSDP2 (its parameters switched for the sharded ones) is tested
on 2 gloo ranks in tests/test_rebinding.py with accelerate's own switch function.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate")

from gaugeopt import DDCAdam, DDCMuon, SymmetryCompatible, find_gauges  # noqa: E402
from gaugeopt.integrations.hf import GaugeOptimizerFactory, optimizer_cls_and_kwargs  # noqa: E402
from gaugeopt.testing import relative_error  # noqa: E402

VOCAB, SEQ = 64, 12


class Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int = 32):
        self.ids = torch.randint(0, VOCAB, (size, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def llama(dtype: torch.dtype = torch.float64) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


def gauges_of(model):
    return find_gauges(model, {"input_ids": torch.randint(0, VOCAB, (1, 8)), "use_cache": False}, output="logits")


def next_token_loss(outputs, labels, num_items_in_batch=None):
    """The causal-LM loss in the logits' dtype (transformers' own casts the logits to float32, whose
    rounding would hide float64 equivariance at 1e-8)."""
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())


class LearningRates(transformers.TrainerCallback):
    """Each group's ``(use_muon, lr)`` after every step."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append([(g["use_muon"], g["lr"]) for g in optimizer.param_groups])


def trainer(model, tmp_path, steps: int = 5, max_grad_norm: float = 0.0, **kwargs) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, lr_scheduler_type="cosine",
        warmup_steps=1, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=max_grad_norm, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), compute_loss_func=next_token_loss,
                                **kwargs)


RUNS = {  # how each arm clips: the factory's gauge-invariant clipping, or the Trainer's own
    "factory clipping": lambda gauges: dict(max_grad_norm=0.0, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
        DDCAdam, gauges, lr=1e-2, weight_decay=0.1, max_grad_norm=0.05)),
    "Trainer clipping": lambda gauges: dict(max_grad_norm=0.05, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
        DDCAdam, gauges, lr=1e-2, weight_decay=0.1)),
    "Trainer AdamW": lambda gauges: dict(max_grad_norm=0.0),
}


@pytest.mark.parametrize("arm", list(RUNS))
def test_trainer_with_the_factory_stays_equivariant_and_its_own_clipping_or_adamw_does_not(arm, tmp_path):
    """Train from ``theta`` and from ``g . theta`` (a random element of every family); map the first run
    through ``g`` and compare. 0.05 is below every gradient norm of the run: clipping acts on every step."""
    start = llama()
    gauges = gauges_of(start)
    element = gauges.sample(torch.Generator().manual_seed(3), spread=1.0)
    moved = copy.deepcopy(start)
    gauges.bind(moved).apply(moved, element)
    assert relative_error(moved, start)[0] > 0.1  # the element moves the start
    initial = copy.deepcopy(start)
    for i, model in enumerate((start, moved)):
        run = trainer(model, tmp_path / str(i), **RUNS[arm](gauges.bind(model)))
        run.train()
        assert run.state.global_step == 5 and run.model is model
    assert relative_error(start, initial)[0] > 1e-2  # the Trainer trained it
    gauges.bind(start).apply(start, element)
    error = relative_error(start, moved)[0]
    if arm == "factory clipping":
        assert error <= 1e-10, error  # 2.9e-16 measured
    else:
        assert error >= 1e-5, error  # 1.0e-3 (the Trainer's clipping) and 9.8e-2 (AdamW) measured


def test_the_factory_builds_ddc_muon_with_its_split_and_the_trainers_schedule(tmp_path):
    """DDCMuon from the factory, with gauges found on a float64 copy (bound to the Trainer's float32
    model): hidden matrices take Muon, the rest Adam, vectors (the norm gains) no decay; the Trainer's
    cosine schedule scales both rules and keeps their ratio."""
    model = llama(torch.float32)
    gauges = gauges_of(copy.deepcopy(model).double())
    rates = LearningRates()
    run = trainer(model, tmp_path, steps=4, callbacks=[rates], optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
        DDCMuon, gauges, lr=0.02, adam_lr=4e-3, weight_decay=0.1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    run.train()
    optimizer = run.optimizer.optimizer  # accelerate wraps it
    assert isinstance(optimizer, DDCMuon) and optimizer.gauges.model is model
    rows = {row.parameter: row for row in optimizer.split(print_table=False)}
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2}
    embedding_and_head = {"model.embed_tokens.weight", "lm_head.weight"}
    assert {n for n, r in rows.items() if r.rule == "muon"} == matrices - embedding_and_head
    assert {n for n, r in rows.items() if r.weight_decay == 0.0} == {n for n, p in model.named_parameters()} - matrices
    assert all(r.frame != "none: outside gauges.model" for r in rows.values())
    base = {g["use_muon"]: g["initial_lr"] for g in optimizer.param_groups}
    assert base == {True: 0.02, False: 4e-3}
    muon_rates = [dict(seen)[True] for seen in rates.seen]
    assert len(set(muon_rates)) == 4 and muon_rates[0] == 0.02  # the warm-up's end, then the cosine
    for seen in rates.seen[:-1]:  # (the last is 0)
        assert dict(seen)[True] / dict(seen)[False] == pytest.approx(0.02 / 4e-3, rel=1e-12)
    assert max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters()) > 1e-3


def test_the_factory_refuses_bad_arguments_when_the_trainer_is_set_up():
    gauges = gauges_of(llama())
    with pytest.raises(TypeError, match="learning_rate"):
        optimizer_cls_and_kwargs(DDCAdam, gauges, learning_rate=1e-3)
    with pytest.raises(TypeError, match="DDCAdam, DDCMuon or SymmetryCompatible"):
        optimizer_cls_and_kwargs(torch.optim.AdamW, gauges)
    with pytest.raises(ValueError, match="SymmetryCompatible takes no GaugeSet"):
        optimizer_cls_and_kwargs(SymmetryCompatible, gauges)
    with pytest.raises(ValueError, match="max_grad_norm"):
        optimizer_cls_and_kwargs(DDCAdam, gauges, max_grad_norm=-1.0)
    factory, kwargs = optimizer_cls_and_kwargs(SymmetryCompatible, None, weight_decay=0.1)
    assert factory is GaugeOptimizerFactory
    optimizer = factory()(llama(), **kwargs)
    assert isinstance(optimizer, SymmetryCompatible) and {g["weight_decay"] for g in optimizer.param_groups} == {0.1}


def test_the_example_script_trains_with_the_factory(tmp_path):
    path = Path(__file__).parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = example.train(steps=3, output_dir=str(tmp_path), max_grad_norm=0.5, optimizer="ddc_muon")
    assert run.state.global_step == 3 and run.args.max_grad_norm == 0
    assert isinstance(run.optimizer.optimizer, DDCMuon)
    losses = [e["loss"] for e in run.state.log_history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
