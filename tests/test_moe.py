"""MixLoRA layer and model against the loop-simple oracle (tests/reference.py), in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_model
from reference import reference_aux_loss, reference_lora_linear, reference_moe_forward

from mixlora import MixLoraConfig, adapter_state_dict, get_mixlora_model, moe_layers
from mixlora.lora import LoraLinear
from mixlora.moe import MixLoraSparseMoe

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "dense", "qkv_proj", "gate_proj", "up_proj", "down_proj",
               "fc1", "fc2", "gate_up_proj"]
FFN_TARGETS = {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "gate_up_proj"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _mixlora(arch: str, targets=None, **overrides):
    model = tiny_model(arch, torch.float64)
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = MixLoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "num_experts": 4, "top_k": 2,
                              "target_modules": [t for t in (targets or ALL_TARGETS) if t in names], **overrides})
    get_mixlora_model(model, config)
    randomize_adapters(model)
    return model, config


def _hidden_act(model) -> str:
    cfg = model.config
    return getattr(cfg, "hidden_activation", None) or cfg.hidden_act


def _layer_grads(moe, x, out):
    params = [x] + [p for p in moe.parameters() if p.requires_grad]
    return torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out) + 0.1 * torch.randn_like(out).abs())


@pytest.mark.parametrize("top_k,num_experts,T,r", [
    (2, 4, 13, 8),   # the common case
    (1, 4, 13, 8),   # K=1: renormalised weights are 1, the router gets no gradient from the output
    (4, 4, 13, 16),  # K=E: every expert sees every token
    (2, 5, 1, 16),   # T=1, prime E: most experts receive no token
])
def test_layer_matches_oracle(arch, top_k, num_experts, T, r):
    model, _ = _mixlora(arch, r=r, num_experts=num_experts, top_k=top_k)
    moe = moe_layers(model)[0]
    torch.manual_seed(3)
    x = torch.randn(1, T, moe.adapters.default.moe_gate.in_features, dtype=torch.float64, requires_grad=True)
    ours = moe(x)
    ref, _ = reference_moe_forward(moe, x, _hidden_act(model))
    assert _rel(ours, ref) <= 1e-9
    seed = torch.seed()
    torch.manual_seed(seed)
    g_ours = _layer_grads(moe, x, ours)
    torch.manual_seed(seed)
    g_ref = _layer_grads(moe, x, ref)
    names = ["x"] + [n for n, p in moe.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_ours, g_ref, strict=True):
        if top_k == 1 and name.endswith("moe_gate.weight"):  # renormalised single weight is 1: no router gradient
            assert a.abs().max() <= 1e-12 and b.abs().max() <= 1e-12
        else:
            assert _rel(a, b) <= 1e-9, name


def test_expert_without_tokens_gets_zero_grad():
    model, _ = _mixlora("llama", num_experts=4, top_k=1)
    moe = moe_layers(model)[0]
    with torch.no_grad():  # make expert 3 lose against expert 0 for every input: it receives no token
        moe.adapters.default.moe_gate.weight[3] = moe.adapters.default.moe_gate.weight[0] - 5.0 * moe.adapters.default.moe_gate.weight[0].sign()
    x = torch.randn(1, 9, moe.adapters.default.moe_gate.in_features, dtype=torch.float64) * 0.1 + moe.adapters.default.moe_gate.weight[0].sign()
    x.requires_grad_(True)
    out = moe(x)
    ref, logits = reference_moe_forward(moe, x, "silu")
    assert (logits.argmax(-1) != 3).all()
    assert _rel(out, ref) <= 1e-9
    out.sum().backward()
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert moe.adapters.default.experts[name].lora_A.grad[3].abs().max() == 0
        assert moe.adapters.default.experts[name].lora_B.grad[3].abs().max() == 0
        assert moe.adapters.default.experts[name].lora_B.grad[0].abs().max() > 0


@pytest.mark.parametrize("targets", [
    ["q_proj", "v_proj", "gate_proj", "down_proj"],  # up_proj has no expert LoRA: rank-0 stand-in
    ["k_proj", "up_proj"],                            # only the up projection is adapted
])
def test_partial_targets_match_oracle(targets):
    model, _ = _mixlora("llama", targets=targets)
    moe = moe_layers(model)[0]
    x = torch.randn(2, 5, moe.adapters.default.moe_gate.in_features, dtype=torch.float64, requires_grad=True)
    ours, (ref, _) = moe(x), reference_moe_forward(moe, x, "silu")
    assert _rel(ours, ref) <= 1e-9
    assert sorted(moe.adapters.default.experts) == sorted(t for t in targets if t in FFN_TARGETS)


def test_dora_experts_and_attention_match_oracle():
    model, _ = _mixlora("llama", use_dora=True)
    moe = moe_layers(model)[0]
    x = torch.randn(1, 11, moe.adapters.default.moe_gate.in_features, dtype=torch.float64, requires_grad=True)
    ours, (ref, _) = moe(x), reference_moe_forward(moe, x, "silu")
    assert _rel(ours, ref) <= 1e-9
    g = torch.randn_like(ours)
    params = [x] + [p for p in moe.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g), strict=True):
        assert _rel(a, b) <= 1e-9
    assert moe.adapters.default.experts["gate_proj"].lora_magnitude_vector.shape == (4, 45)
    q = model.model.layers[0].self_attn.q_proj
    xa = torch.randn(3, 32, dtype=torch.float64)
    assert _rel(q(xa), reference_lora_linear(q, xa)) <= 1e-12


def _patched_oracle_model(monkeypatch, model):
    """Route every MoE and attention LoRA of `model` through the oracles."""
    act = _hidden_act(model)

    def moe_forward(self, h):
        y, self.adapters.default.router_logits = reference_moe_forward(self, h, act)
        return y

    monkeypatch.setattr(MixLoraSparseMoe, "forward", moe_forward)
    monkeypatch.setattr(LoraLinear, "forward", reference_lora_linear)


def test_model_logits_loss_and_every_adapter_grad_match_oracle(arch, monkeypatch):
    model, config = _mixlora(arch, router_aux_loss_coef=0.05)
    model.train()  # aux loss joins the loss; dropout is 0 so training mode is deterministic
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding rows must not count in the aux loss
    params = adapter_state_dict(model)

    def run():
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        return out, torch.autograd.grad(out.loss, list(params.values()))

    ours, g_ours = run()
    logits = [m.adapters.default.router_logits for m in moe_layers(model)]
    aux = reference_aux_loss(logits, config.top_k, config.router_aux_loss_coef, mask)
    assert _rel(ours.aux_loss, aux) <= 1e-12 and aux > 0
    with monkeypatch.context() as m:
        _patched_oracle_model(m, model)
        ref, g_ref = run()
    assert _rel(ours.logits, ref.logits) <= 1e-9
    assert _rel(ours.loss, ref.loss) <= 1e-12
    for name, a, b in zip(params, g_ours, g_ref, strict=True):
        assert _rel(a, b) <= 1e-9, name


def test_single_expert_top1_is_plain_lora_ffn():
    model, _ = _mixlora("llama", num_experts=1, top_k=1, targets=["gate_proj", "up_proj", "down_proj"])
    moe = moe_layers(model)[0]
    x = torch.randn(6, 32, dtype=torch.float64)
    s = moe.adapters.default.scaling

    def lora(name, inp):
        e = moe.adapters.default.experts[name]
        return inp @ getattr(moe, name).weight.T + s * (inp @ e.lora_A[0].T) @ e.lora_B[0].T

    h = torch.nn.functional.silu(lora("gate_proj", x)) * lora("up_proj", x)
    assert _rel(moe(x), lora("down_proj", h)) <= 1e-12


def test_fresh_adapter_leaves_the_model_unchanged(arch):
    base = tiny_model(arch, torch.float64)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    before = base(input_ids=ids).logits
    names = {n.split(".")[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    config = MixLoraConfig(r=8, num_experts=3, top_k=2, target_modules=[n for n in ALL_TARGETS if n in names])
    after = get_mixlora_model(base, config)(input_ids=ids).logits
    assert _rel(after, before) <= 1e-12


def test_dropout_only_in_training():
    model, _ = _mixlora("llama", lora_dropout=0.3)
    moe = moe_layers(model)[0]
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    model.eval()
    ref, _ = reference_moe_forward(moe, x, "silu")
    assert _rel(moe(x), ref) <= 1e-9  # no dropout in eval, whatever lora_dropout is
    model.train()
    assert _rel(moe(x), ref) > 1e-6  # dropout is active in training
