"""LoRA+ parameter groups (mixlora.optim): every LoRA B at lr·λ, everything else at lr, per adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_model

from mixlora import MixLoraConfig, adapter_state_dict, get_mixlora_model, get_multi_mixlora_model
from mixlora.optim import adapter_param_groups

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _names(model, group, adapter=None):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in adapter_state_dict(model, adapter).items() if id(p) in ids}


def test_lora_plus_puts_every_b_and_only_b_in_the_fast_group():
    model = get_mixlora_model(tiny_model("llama"), MixLoraConfig(target_modules=TARGETS, use_dora=True,
                                                                 loraplus_lr_ratio=16.0))
    slow, fast = adapter_param_groups(model, 1e-3)
    names = set(adapter_state_dict(model))
    b = {n for n in names if n.endswith("lora_B.weight") or n.endswith(".lora_B")}
    assert b and _names(model, fast) == b and _names(model, slow) == names - b
    assert any("moe_gate" in n for n in _names(model, slow)) and any("magnitude" in n for n in _names(model, slow))
    assert (slow["lr"], fast["lr"]) == (1e-3, 16e-3) and fast["lora_plus_b"] and not slow["lora_plus_b"]
    lora = get_mixlora_model(tiny_model("llama"), MixLoraConfig(target_modules=TARGETS))  # no ratio: one group
    (plain,) = adapter_param_groups(lora, 1e-3)
    assert plain["lr"] == 1e-3 and not plain["lora_plus_b"] and _names(lora, plain) == set(adapter_state_dict(lora))


def test_one_adamw_step_moves_b_lambda_times_further():
    """Adam's first step moves each weight by lr·g/(|g|+eps) ≈ ±lr: B by λ·lr, A by lr."""
    model = get_mixlora_model(tiny_model("llama", torch.float64), MixLoraConfig(target_modules=TARGETS,
                                                                                loraplus_lr_ratio=8.0,
                                                                                lora_dropout=0.0))
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}
    opt = torch.optim.AdamW(adapter_param_groups(model, 1e-3), eps=1e-30, weight_decay=0.0)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for n, p in adapter_state_dict(model).items():
        step = (p.detach() - before[n]).abs()
        moved = step[p.grad != 0]
        want = 8e-3 if "lora_B" in n.split(".") else 1e-3
        assert moved.numel() and torch.allclose(moved, torch.full_like(moved, want), rtol=1e-9), n


def test_each_adapter_of_a_multi_adapter_model_has_its_own_ratio():
    model = get_multi_mixlora_model(tiny_model("llama"), {
        "a": MixLoraConfig(target_modules=TARGETS, loraplus_lr_ratio=4.0),
        "b": MixLoraConfig(target_modules=["q_proj", "down_proj"])})
    groups = adapter_param_groups(model, 1e-3, "a") + adapter_param_groups(model, 2e-3, "b")
    assert [(g["adapter"], g["lr"]) for g in groups] == [("a", 1e-3), ("a", 4e-3), ("b", 2e-3)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="name one"):
        adapter_param_groups(model, 1e-3)


def test_mixlora_train_with_lora_plus(tmp_path, monkeypatch):
    """`mixlora train` builds its optimizer from adapter_param_groups: with loraplus_lr_ratio the B group runs at
    λ·lr through the schedule, and the history records the adapter's (A-group) lr."""
    import json

    from test_cli import _records, _save_tiny_llama

    from mixlora.train import TrainConfig, fit

    monkeypatch.setenv("MIXLORA_CACHE", str(tmp_path / "cache"))
    base, data = tmp_path / "base", tmp_path / "data.jsonl"
    _save_tiny_llama(base)
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    seen = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(
        [(g["lora_plus_b"], g["lr"]) for g in self.param_groups]))
    cfg = TrainConfig(base_model=str(base), data=str(data), output_dir=str(tmp_path / "out"), steps=3, batch_size=2,
                      max_seq_len=32, eval_size=0, save_every=0, lr=1e-2, warmup_ratio=0.0,
                      adapter={"num_experts": 2, "top_k": 1, "r": 2, "loraplus_lr_ratio": 4.0})
    _, _, summary = fit(cfg, log=lambda line: None)
    assert [[b for b, _ in groups] for groups in seen] == [[False, True]] * 3
    assert [[lr for _, lr in groups] for groups in seen] == \
        [pytest.approx([lr, 4 * lr], rel=1e-12) for lr in (1e-2, 1e-2 * 2 / 3, 1e-2 / 3)]
    assert [h["lr"] for h in summary["history"]] == pytest.approx([1e-2 * 2 / 3, 1e-2 / 3, 0.0])
    assert summary["adapter_config"]["loraplus_lr_ratio"] == 4.0
