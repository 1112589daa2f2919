"""Train a tiny Hugging Face Llama with DDCAdam under ``transformers.Trainer``.

    python examples/hf_trainer.py --steps 50

The gauges are found once on the model, DDCAdam gets them, and the Trainer gets the optimizer and
its learning-rate schedule through ``optimizers=(optimizer, scheduler)``; everything else (batching,
the loss from ``labels``, logging) is the Trainer's own. Random initial weights and generated
token sequences: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from gaugeopt import DDCAdam, find_gauges

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


def train(steps: int = 50, output_dir: str | None = None, lr: float = 3e-3) -> transformers.Trainer:
    model = tiny_llama()
    example = {"input_ids": torch.randint(0, VOCAB, (1, 8)), "use_cache": False}
    gauges = find_gauges(model, example, output="logits")  # the model's logits feed a cross-entropy
    optimizer = DDCAdam(model.parameters(), gauges, lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    args = transformers.TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="gaugeopt-trainer-"), max_steps=steps,
        per_device_train_batch_size=8, logging_steps=max(1, steps // 5), save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=CountingTokens(256),
                                   optimizers=(optimizer, scheduler))
    trainer.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    trainer = train(args.steps, lr=args.lr)
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']:>4}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.2e}")


if __name__ == "__main__":
    main()
