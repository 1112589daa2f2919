"""Reference answers of ``find_gauges``: what it finds on a set of small models, in full detail.

``tests/data/discovery_reference.json`` holds the answers of the discovery algorithm as it was before
the attention probes were confined to the sub-graph from each projection to its attention input and
analysed once per layer structure (commit 3c0eedf, which probed every layer through the whole model
with one basis vector per channel). ``tests/test_discovery.py`` asserts that today's discovery gives
the same answers. To write the file from the code on the path (only when an answer is meant to change):

    PYTHONPATH=src python tests/discovery_reference.py tests/data/discovery_reference.json

A rotation family's Lie algebra is recorded by basis-free invariants of its span: its dimension, its
blocks, and the norms of the orthogonal projections of three fixed random skew matrices onto it.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from gaugeopt import find_gauges
from gaugeopt.models import TransformerLM, TransformerLMConfig

SEQ = 8


def _lm(**kw):
    def make():
        return TransformerLM(TransformerLMConfig(**{"d_model": 64, "n_heads": 4, "n_layers": 3, **kw})).double()
    return make, lambda: torch.randint(0, 65, (1, SEQ))


# name -> (model factory, example factory); the example is drawn after the model, under the same seed
LM_CONFIGS = {
    "lm-full": _lm(),
    "lm-full-gqa": _lm(n_kv_heads=2),
    "lm-full-theta1e6": _lm(rope_base=1e6),
    "lm-partial-gqa": _lm(rope="partial", n_kv_heads=2),
    "lm-partial-theta1e6": _lm(rope="partial", rope_base=1e6),
    "lm-none": _lm(rope="none"),
    "lm-layernorm-relu-bias": _lm(rope="none", norm="layernorm", mlp="relu", attn_bias=True, mlp_bias=True,
                                  head_bias=True),
    "lm-head-dim-64": _lm(d_model=128, n_heads=2, n_layers=2),
}


def _hf(make_config):
    def make():
        import transformers

        config = make_config(transformers)
        cls = {"LlamaConfig": "LlamaForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
               "Gemma3TextConfig": "Gemma3ForCausalLM", "BertConfig": "BertForMaskedLM",
               "GPT2Config": "GPT2LMHeadModel"}[type(config).__name__]
        return getattr(transformers, cls)(config).double()
    return make, lambda: torch.randint(0, 64, (1, SEQ))


_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=32)
HF_CONFIGS = {
    "hf-llama": _hf(lambda t: t.LlamaConfig(**_COMMON, tie_word_embeddings=False)),
    "hf-llama-theta5e5": _hf(lambda t: t.LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_theta=5e5)),
    "hf-qwen3": _hf(lambda t: t.Qwen3Config(**_COMMON, tie_word_embeddings=False)),
    "hf-gemma3": _hf(lambda t: t.Gemma3TextConfig(**_COMMON, sliding_window=4)),
    "hf-bert": _hf(lambda t: t.BertConfig(**_COMMON)),
    "hf-gpt2": _hf(lambda t: t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                          bos_token_id=0, eos_token_id=0)),
}


def span_invariants(algebra: torch.Tensor) -> list[float]:
    """Norms of the projections of three fixed random skew matrices onto span(algebra)."""
    d = algebra.shape[-1]
    gen = torch.Generator().manual_seed(7)
    probes = torch.randn(3, d, d, generator=gen, dtype=torch.float64)
    probes = (probes - probes.transpose(1, 2)).reshape(3, -1)
    if algebra.numel() == 0:
        return [0.0, 0.0, 0.0]
    if len(algebra) == d * (d - 1) // 2:  # independent generators filling so(d): the skew probes lie in it
        return probes.norm(dim=1).tolist()
    basis, _ = torch.linalg.qr(algebra.reshape(len(algebra), -1).T)
    return (probes @ basis).norm(dim=1).tolist()


def signature(gauges) -> dict:
    """Everything a GaugeSet says, in JSON types: per family its kind, dimension and parameters (and for
    rotations its blocks, span invariants, row and column indices and head grouping), every
    candidate left out with its reason, and the input and output layers."""
    families = []
    for f in gauges:
        row = {"name": f.name, "kind": f.kind, "dim": f.dim, "parameters": list(f.parameters)}
        if hasattr(f, "algebra"):
            row.update(blocks=[list(b) for b in f.blocks], span=span_invariants(f.algebra),
                       left=[[w, b, rows.tolist(), q] for w, b, rows, q in f.left],
                       right=[[w, cols.tolist()] for w, cols in f.right], query_group=list(f.query_group))
        families.append(row)
    return {"families": families, "skipped": [[s.site, s.family, s.reason] for s in gauges.skipped],
            "input_layers": list(gauges.input_layers), "output_layers": list(gauges.output_layers)}


def discover(key: str):
    """The model of ``key`` (float64, seed 0), its example, and the gauges found on it."""
    make_model, make_example = {**LM_CONFIGS, **HF_CONFIGS}[key]
    torch.manual_seed(0)
    model = make_model()
    example = make_example()
    if key.startswith("hf-"):
        example = {"input_ids": example} if key == "hf-bert" else {"input_ids": example, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, example, find_gauges(model, example, output="logits")


if __name__ == "__main__":
    answers = {key: signature(discover(key)[2]) for key in {**LM_CONFIGS, **HF_CONFIGS}}
    with open(sys.argv[1], "w") as handle:
        json.dump(answers, handle, indent=None, separators=(",", ":"))
        handle.write("\n")
