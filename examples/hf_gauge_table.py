"""The table of docs/integrations.md: gauges of tiny Hugging Face models, their invariance, and the
equivariance of DDCAdam, DDCMuon and AdamW on them.

    python examples/hf_gauge_table.py          # under a minute on 2 CPU cores

Every model is built from a tiny config (2 layers, width 32, 4 query and 2 key/value heads of
dimension 8; random weights moved off their init, float64) after ``torch.manual_seed(0)``, as in
``tests/test_hf_models.py``. Columns:

- families, group dimension, parameters touched: what ``find_gauges`` returns on an 1 x 8 example;
- invariance: the largest relative change of the log-probabilities (2 x 8 tokens) over a random
  element of each gauge kind and of their product (spread 1);
- DDCAdam, DDCMuon, AdamW: ``gaugeopt.testing.check_equivariance`` after 20 steps at lr 1e-2
  (weight decay 0.1 for the Adam family) on a next-token loss, from a random element of the product.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import transformers

from gaugeopt import DDCAdam, DDCMuon, find_gauges
from gaugeopt.testing import check_equivariance

VOCAB, SEQ = 64, 8
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=32)


def _untied_gpt2() -> torch.nn.Module:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


MODELS = {
    "Llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)),
    "Qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, tie_word_embeddings=False)),
    "Gemma3": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**COMMON, sliding_window=4)),
    "Mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{**COMMON, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager", tie_word_embeddings=False)),
    "GPT-2, head untied": _untied_gpt2,
    "Granite (logits_scaling 4)": lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **COMMON, tie_word_embeddings=False, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.3)),
    "BertForMaskedLM (input_ids only)": lambda: transformers.BertForMaskedLM(transformers.BertConfig(**COMMON)),
}


def tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def jitter(model: torch.nn.Module) -> torch.nn.Module:
    """Move every weight off its init (gains off 1, biases off 0), so no symmetry is trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def next_token_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def invariance(model: torch.nn.Module, gauges) -> float:
    ids = tokens(2, 1)
    before = model(input_ids=ids).logits.log_softmax(-1)
    gen, worst = torch.Generator().manual_seed(3), 0.0
    for kinds in [*gauges.kinds, None]:
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(gen, families=kinds, spread=1.0))
        after = moved(input_ids=ids).logits.log_softmax(-1)
        worst = max(worst, ((after - before).norm() / before.norm()).item())
    return worst


OPTIMIZERS = {
    "DDCAdam": lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1),
    "DDCMuon": lambda m, g: DDCMuon(m.named_parameters(), g, lr=1e-2, adam_lr=1e-2),
    "AdamW": lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


def main() -> None:
    torch.set_num_threads(1)  # one reduction order: the rounding-level figures repeat exactly
    batches = [tokens(2, seed) for seed in range(4)]
    print("| model | families, group dim, parameters touched | invariance | " + " | ".join(OPTIMIZERS) + " |")
    print("|---|---|---|" + "---|" * len(OPTIMIZERS))
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = jitter(make().double().eval())
        gauges = find_gauges(model, {"input_ids": tokens(1, 0), "use_cache": False}, output="logits")
        errors = [check_equivariance(build, model, gauges, batches, next_token_loss, steps=20).error
                  for build in OPTIMIZERS.values()]
        found = f"{len(gauges)}, {sum(f.dim for f in gauges)}, {len(gauges.parameters_touched())}"
        print(f"| {name} | {found} | {invariance(model, gauges):.1e} | "
              + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
