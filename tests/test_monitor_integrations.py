"""The monitor's callbacks in tiny real runs: the Hugging Face Trainer (readings through its TensorBoard
reporter and its log history) and Lightning (readings through the Trainer's logger)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt.experiments.common import per_token_cross_entropy
from gaugeopt.models import TransformerLM, TransformerLMConfig

VOCAB, SEQ = 32, 12


def event_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = log_dir.rglob("events.out.tfevents.*")
    events = EventAccumulator(str(events_file))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def counting_tokens(size: int, seed: int = 0) -> torch.Tensor:
    """Sequences ``s, s+1, ... (mod VOCAB)`` from random starts: learnable next-token data."""
    starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(SEQ)) % VOCAB


# ----- Hugging Face ------------------------------------------------------------------------------------------
def test_hf_trainer_logs_readings_through_its_reporters(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    from gaugeopt.integrations.hf import DeadDirectionCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = counting_tokens(64)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def per_token_loss(outputs, ids):  # position t predicts token t + 1
        return F.cross_entropy(outputs.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False))
    gauges = gaugeopt.find_gauges(model, {"input_ids": counting_tokens(1, seed=1)[:, :8], "use_cache": False},
                                  output="logits")
    optimizer = gaugeopt.DDCAdam(model.parameters(), gauges, lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                                          logging_steps=3, save_strategy="no", report_to=["tensorboard"],
                                          use_cpu=True, disable_tqdm=True, max_grad_norm=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(optimizer, schedule))
    probe = counting_tokens(2, seed=2)
    callback = DeadDirectionCallback(trainer, gauges, probe=(probe, probe), loss=per_token_loss, every=2)
    trainer.add_callback(callback)
    trainer.train()

    table = callback.monitor.table()
    assert [row["step"] for row in table] == [2, 4, 6]
    history = [entry for entry in trainer.state.log_history if any(k.startswith("dds/") for k in entry)]
    assert [entry["step"] for entry in history] == [2, 4, 6]
    assert any("loss" in entry for entry in trainer.state.log_history)  # the Trainer's own logging goes on
    sites = {tag.split("/")[1] for tag in table[0] if tag.startswith("dds/")}
    assert {"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj", "lm_head"} <= sites
    for row, entry in zip(table, history):
        assert entry["grad_norm/gauge_invariant"] == row["grad_norm/gauge_invariant"] > 0  # read before zero_grad
        assert entry["frozen_units/total"] == 0.0  # DDCAdam's, through accelerate's optimizer wrapper
        assert entry["gauge_drift/norm_scale:model.norm"] < 1e-4  # DDCAdam holds the norm gains

    scalars = event_scalars(tmp_path)  # the Trainer's TensorBoard reporter names them train/<tag>
    dds = [tag for tag in scalars if tag.startswith("train/dds/")]
    assert len(dds) == len(sites) * 6
    assert all([step for step, _ in scalars[tag]] == [2, 4, 6] for tag in dds)
    assert [step for step, _ in scalars["train/gauge_drift/neuron_scale:model.layers.0.mlp.up_proj"]] == [2, 4, 6]
    last = table[-1]["dds/lm_head/logdet_G"]
    assert scalars["train/dds/lm_head/logdet_G"][-1][1] == pytest.approx(last, rel=1e-6)


def test_hf_callback_wants_a_trainer():
    pytest.importorskip("transformers")
    from gaugeopt.integrations.hf import DeadDirectionCallback

    with pytest.raises(TypeError, match="trainer"):
        DeadDirectionCallback(None, None, probe=(0, 0), loss=lambda o, y: o)


# ----- Lightning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning 2.6 on torch 2.13
def test_lightning_logs_readings_through_the_trainers_logger(tmp_path, accumulate):
    lightning = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    from gaugeopt.integrations.lightning import DeadDirectionCallback

    class LanguageModel(lightning.pytorch.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                                         max_seq_len=SEQ))
            self.gauges = gaugeopt.find_gauges(self.net, counting_tokens(1, seed=1)[:, :8], output="logits")

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            return per_token_cross_entropy(self.net(tokens[:, :-1]), tokens[:, 1:]).mean()

        def configure_optimizers(self):
            return gaugeopt.DDCAdam(self.net.parameters(), self.gauges, lr=3e-3)

    module = LanguageModel()
    probe = counting_tokens(2, seed=2)
    callback = DeadDirectionCallback(module.gauges, probe=(probe[:, :-1], probe[:, 1:]),
                                     loss=per_token_cross_entropy, every=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(counting_tokens(64)), batch_size=4)
    trainer = lightning.pytorch.Trainer(max_steps=6, accumulate_grad_batches=accumulate, callbacks=[callback],
                                        logger=CSVLogger(tmp_path, name="run"), accelerator="cpu", devices=1,
                                        enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, data)

    table = callback.monitor.table()
    assert [row["step"] for row in table] == [2, 4, 6]  # optimizer steps, read once each
    assert callback.monitor.model is module.net
    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = [row for row in csv.DictReader(metrics_file.open()) if row.get("dds/head/logdet_G")]
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    dds = [column for column in rows[0] if column.startswith("dds/")]
    assert len(dds) == len(callback.monitor.sites) * 6 >= 4
    for row, reading in zip(rows, table):
        assert float(row["dds/head/logdet_G"]) == pytest.approx(reading["dds/head/logdet_G"], rel=1e-12)
        assert float(row["gauge_drift/norm_scale:norm"]) < 1e-4
        assert float(row["grad_norm/gauge_invariant"]) > 0 and not math.isnan(float(row["frozen_units/total"]))
