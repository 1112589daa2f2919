"""Train a tiny Hugging Face Llama with DDCAdam (or DDCMuon) under ``transformers.Trainer``.

    python examples/hf_trainer.py --steps 50 [--optimizer ddc_muon] [--max-grad-norm 1.0]

The gauges are found once on the model; ``gaugeopt.integrations.hf.optimizer_cls_and_kwargs`` hands
the optimizer to the Trainer, which builds it on the model it trains and keeps everything else: its
learning-rate schedule (here cosine after a warm-up), batching, the loss from ``labels``, logging.
Random initial weights and generated token sequences: nothing is downloaded.

Gradient clipping: the Trainer's own (``max_grad_norm``, 1.0 by default) clips by the global norm of
the raw gradients, which is not gauge invariant and breaks the optimizer's equivariance. It is
switched off (``max_grad_norm=0``) and the factory's ``max_grad_norm`` clips by
``gaugeopt.clip_grad_norm_`` instead, just before every optimizer step.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from gaugeopt import DDCAdam, DDCMuon, find_gauges
from gaugeopt.integrations.hf import optimizer_cls_and_kwargs

VOCAB, SEQ = 64, 16


class CountingTokens(torch.utils.data.Dataset):
    """Sequences ``s, s+1, s+2, ... (mod VOCAB)`` from random starts: learnable next-token data. The
    Trainer's causal-LM loss reads ``labels``."""

    def __init__(self, size: int, seed: int = 0):
        starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


OPTIMIZERS = {
    "ddc_adam": lambda lr: (DDCAdam, dict(lr=lr, weight_decay=0.1)),
    "ddc_muon": lambda lr: (DDCMuon, dict(lr=0.02, adam_lr=lr, weight_decay=0.1)),
}


def train(steps: int = 50, output_dir: str | None = None, lr: float = 3e-3, max_grad_norm: float = 1.0,
          optimizer: str = "ddc_adam") -> transformers.Trainer:
    model = tiny_llama()
    example = {"input_ids": torch.randint(0, VOCAB, (1, 8)), "use_cache": False}
    gauges = find_gauges(model, example, output="logits")  # the model's logits feed a cross-entropy
    cls, settings = OPTIMIZERS[optimizer](lr)
    args = transformers.TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="gaugeopt-trainer-"), max_steps=steps,
        per_device_train_batch_size=8, logging_steps=max(1, steps // 5), save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        max_grad_norm=0.0,  # the Trainer's own clipping off: see the docstring
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingTokens(256),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
                                       cls, gauges, max_grad_norm=max_grad_norm, **settings))
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3, help="DDCAdam's rate (DDCMuon's Adam part)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="ddc_adam")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the gradients' gauge-invariant norm to this (the Trainer's default)")
    args = parser.parse_args()
    trainer = train(args.steps, lr=args.lr, max_grad_norm=args.max_grad_norm, optimizer=args.optimizer)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:>4}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.2e}")


if __name__ == "__main__":
    main()
