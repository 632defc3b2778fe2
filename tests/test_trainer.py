"""A MixLoRA model trains under `transformers.Trainer` (aux loss included) and `MixLoraTrainer` saves the adapter only.

Tiny random LlamaForCausalLM from a LlamaConfig (no downloads). Gradient checkpointing needs the non-reentrant
implementation: with the reentrant one the router logits kept for the aux loss carry no gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from mixlora import MixLoraConfig, MixLoraModelForCausalLM, get_mixlora_model
from mixlora.train import MixLoraTrainer

VOCAB = 64


def _model(path=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    if path is not None:
        base.save_pretrained(path)
    adapter = MixLoraConfig(base_model_name_or_path=None if path is None else str(path), num_experts=4, top_k=2, r=4,
                            lora_dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    return get_mixlora_model(base, adapter)


class _FixedBatch(torch.utils.data.Dataset):
    """The same 4 sequences every epoch: the loss must fall on them."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, VOCAB, (4, 16), generator=g)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:6] = -100  # a masked prompt
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(16, dtype=torch.long), "labels": labels}


def _args(tmp_path, **kwargs):
    values = {"output_dir": str(tmp_path / "run"), "max_steps": 8, "learning_rate": 3e-2,
              "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "logging_steps": 1,
              "save_strategy": "no", "report_to": [], "use_cpu": True, "seed": 0, "lr_scheduler_type": "constant"}
    return TrainingArguments(**{**values, **kwargs})


def test_loss_includes_aux_loss():
    model = _model()
    model.train()
    batch = _FixedBatch()[0]
    batch = {k: v[None] for k, v in batch.items()}
    out = model(**batch)
    lm = F.cross_entropy(out.logits[0, :-1].float(), batch["labels"][0, 1:], ignore_index=-100)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, lm + out.aux_loss)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_loss_falls(tmp_path, gradient_checkpointing):
    model = _model()
    kwargs = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} \
        if gradient_checkpointing else {}
    trainer = MixLoraTrainer(model=model, args=_args(tmp_path, **kwargs), train_dataset=_FixedBatch())
    router = [m for n, m in model.named_parameters() if n.endswith("moe_gate.weight")][0].detach().clone()
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.25, losses
    # The aux loss reaches the router through the Trainer's backward.
    assert not torch.equal(router, [m for n, m in model.named_parameters() if n.endswith("moe_gate.weight")][0])


def test_bf16_autocast_on_cpu(tmp_path):
    model = _model()
    trainer = MixLoraTrainer(model=model, args=_args(tmp_path, bf16=True), train_dataset=_FixedBatch())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_save_model_writes_adapter_only_and_reloads(tmp_path):
    model = _model(tmp_path / "base")
    trainer = MixLoraTrainer(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_FixedBatch())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files

    reloaded, _ = MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    ids = _FixedBatch().ids
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_plain_trainer_would_save_the_full_model(tmp_path):
    """Why MixLoraTrainer exists: Trainer._save calls PreTrainedModel.save_pretrained (the full base model)."""
    trainer = Trainer(model=_model(), args=_args(tmp_path, max_steps=1))
    trainer.save_model(str(tmp_path / "full"))
    assert "model.safetensors" in os.listdir(tmp_path / "full")
