"""Training-time behaviour against independent formulas written here, in float64: jitter, LoRA dropout (which inputs,
which masks), eval determinism of every expert variant, the aux and z losses, the reentrant-checkpointing guard, and
the stable expert sort. Each test is the one a deliberate bug in that behaviour trips (docs/algorithm.md §1-§3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_model
from reference import reference_moe_forward
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import mixlora_kernels.ops as kernel_ops
from mixlora import MixLoraConfig, get_mixlora_model, moe_layers
from mixlora.moe import MixLoraSparseMoe
from mixlora_kernels.ops._common import dropout_scale

H, I = 24, 40


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _moe(E=4, K=2, R=4, **overrides):
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu", num_attention_heads=4)).double()
    config = MixLoraConfig(**{"r": R, "lora_alpha": 2 * R, "num_experts": E, "top_k": K, "lora_dropout": 0.0,
                              "target_modules": ["gate_proj", "up_proj", "down_proj"], **overrides})
    moe = MixLoraSparseMoe(mlp, {"default": config}, "silu")
    with torch.no_grad():
        for lora in moe.adapters.default.experts.values():
            lora.lora_B.normal_(std=0.3)
        moe.adapters.default.moe_gate.weight.normal_(std=0.5)
    return moe


# --- jitter ---------------------------------------------------------------------------------------------------------

def test_jitter_scales_router_and_expert_inputs_in_training_only():
    """Training: x ⊙ U(1−ε, 1+ε), one draw per element, feeds both the router and the experts. Eval: no jitter."""
    moe = _moe(jitter_noise=0.3)
    x = torch.randn(9, H, dtype=torch.float64)
    moe.train()
    torch.manual_seed(7)
    y = moe(x)
    torch.manual_seed(7)
    jittered = x * torch.empty_like(x).uniform_(0.7, 1.3)
    ref, ref_logits = reference_moe_forward(moe, jittered, "silu")
    assert _rel(moe.adapters.default.router_logits, ref_logits) <= 1e-12  # the router saw the jittered x
    assert _rel(y, ref) <= 1e-9  # and so did the experts
    assert _rel(y, reference_moe_forward(moe, x, "silu")[0]) > 1e-3  # the jitter mattered
    moe.eval()
    assert _rel(moe(x), reference_moe_forward(moe, x, "silu")[0]) <= 1e-9


# --- LoRA dropout ---------------------------------------------------------------------------------------------------

def _dropout_oracle(moe, x, p, seed_in, seed_down):
    """The MoE FFN with LoRA dropout written out per slot j = t·K + k: the gate and up LoRA read x_t ⊙ m_in[j] (one
    mask for both), the down LoRA reads h_j ⊙ m_down[j]; the base projections never see a mask."""
    logits = x @ moe.adapters.default.moe_gate.weight.T
    probs = torch.softmax(logits, -1)
    w, e = probs.topk(moe.adapters.default.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    s = moe.adapters.default.scaling
    ex = moe.adapters.default.experts
    y = torch.zeros_like(x)
    T, K = e.shape
    for t in range(T):
        for k in range(K):
            j, ee = t * K + k, int(e[t, k])
            m_in = dropout_scale(torch.tensor([j]), H, p, seed_in, x.dtype)[0]
            m_down = dropout_scale(torch.tensor([j]), I, p, seed_down, x.dtype)[0]
            xd = x[t] * m_in

            def lora(name, base_in, lora_in):
                A, B = ex[name].lora_A[ee], ex[name].lora_B[ee]
                return getattr(moe, name).weight @ base_in + s * B @ (A @ lora_in)

            h = F.silu(lora("gate_proj", x[t], xd)) * lora("up_proj", x[t], xd)
            y[t] = y[t] + w[t, k] * lora("down_proj", h, h * m_down)
    return y


def test_dropout_masks_lora_inputs_only_with_one_mask_for_gate_and_up(monkeypatch):
    moe = _moe(E=3, K=2, lora_dropout=0.4).train()
    seeds = []
    shrink, eac = kernel_ops.lora_shrink, kernel_ops.expand_act_combine

    def record_shrink(x, A, experts, order, offsets, p, seed):
        seeds.append(("in", p, seed))
        return shrink(x, A, experts, order, offsets, p, seed)

    def record_eac(*args):
        seeds.append(("down", args[13], args[14]))
        return eac(*args)

    monkeypatch.setattr(kernel_ops, "lora_shrink", record_shrink)
    monkeypatch.setattr(kernel_ops, "expand_act_combine", record_eac)
    x = torch.randn(7, H, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    (kind_in, p_in, seed_in), (kind_down, p_down, seed_down) = seeds
    assert (kind_in, kind_down, p_in, p_down) == ("in", "down", 0.4, 0.4)
    x_ref = x.detach().clone().requires_grad_()
    ref = _dropout_oracle(moe, x_ref, 0.4, seed_in, seed_down)
    assert _rel(y, ref) <= 1e-9
    assert _rel(y, reference_moe_forward(moe, x.detach(), "silu")[0]) > 1e-3  # dropout mattered
    params = [p for p in moe.parameters() if p.requires_grad]
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, *params], grad)
    theirs = torch.autograd.grad(ref, [x_ref, *params], grad, allow_unused=True)
    names = ["x", *(n for n, p in moe.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert _rel(a, b) <= 1e-9, name


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}, {"lora_init": "gaussian"}],
                         ids=["lora", "rslora", "dora", "gaussian"])
def test_every_expert_variant_is_deterministic_in_eval_with_dropout(variant):
    model = tiny_model("llama", torch.float64)
    config = MixLoraConfig(r=4, num_experts=3, top_k=2, lora_dropout=0.5, **variant,
                           target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    get_mixlora_model(model, config)
    randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    model.eval()
    first = model(input_ids=ids).logits
    assert torch.equal(model(input_ids=ids).logits, first)
    moe = moe_layers(model)[0]
    x = torch.randn(5, 32, dtype=torch.float64)
    assert _rel(moe(x), reference_moe_forward(moe, x, "silu")[0]) <= 1e-9  # no dropout at all in eval
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, first)  # dropout is on in training


# --- aux and z losses -----------------------------------------------------------------------------------------------

def _independent_losses(logits_per_layer, top_k, coef, z_coef, mask):
    """The load-balance and z losses written with Python loops over rows (docs/algorithm.md §1)."""
    rows = [r for logits in logits_per_layer for r, keep in zip(logits.tolist(), mask.reshape(-1).tolist(),
                                                                 strict=True) if keep]
    N, E = len(rows), len(rows[0])
    f = [[0.0] * E for _ in range(top_k)]
    P = [0.0] * E
    z = 0.0
    for r in rows:
        m = max(r)
        ex = [math.exp(v - m) for v in r]
        total = sum(ex)
        p = [v / total for v in ex]
        for k, idx in enumerate(sorted(range(E), key=lambda i: -p[i])[:top_k]):
            f[k][idx] += 1 / N
        for i in range(E):
            P[i] += p[i] / N
        z += (m + math.log(total)) ** 2 / N
    aux = coef * E * sum(f[k][i] * P[i] for k in range(top_k) for i in range(E))
    return aux, z_coef * z


def test_aux_and_z_loss_match_an_independent_formula():
    model = tiny_model("llama", torch.float64)
    config = MixLoraConfig(r=4, num_experts=5, top_k=2, router_aux_loss_coef=0.07, router_z_loss_coef=0.3,
                           target_modules=["gate_proj", "down_proj"])
    get_mixlora_model(model, config)
    randomize_adapters(model)
    for moe in moe_layers(model):
        torch.nn.init.normal_(moe.adapters.default.moe_gate.weight, std=2.0)  # logsumexp far from 1: square and abs differ
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    logits = [moe.adapters.default.router_logits.detach() for moe in moe_layers(model)]
    aux, z = _independent_losses(logits, 2, 0.07, 0.3, mask)
    assert abs(out.aux_loss.item() - (aux + z)) <= 1e-12 * (aux + z)
    assert z > 0.1 * aux  # the z-loss is a visible part of it


# --- gradient checkpointing -----------------------------------------------------------------------------------------

def test_reentrant_checkpointing_is_refused_because_it_drops_the_router_gradient():
    model = get_mixlora_model(tiny_model("llama"), MixLoraConfig(num_experts=4, target_modules=["gate_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"router aux loss lost its gradient: with gradient checkpointing use "
                                           r"gradient_checkpointing_kwargs=\{'use_reentrant': False\}"):
        model(input_ids=ids, labels=ids)


# --- the stable expert sort on every device -------------------------------------------------------------------------

def _experts_with_ties(T, K, E, device):
    g = torch.Generator().manual_seed(T * 31 + E)
    return torch.randint(0, E, (T, K), generator=g).to(device)


@pytest.mark.parametrize("T,K,E", [(1, 1, 3), (300, 2, 8), (1000, 4, 5), (64, 2, 1)])
def test_sort_slots_is_a_stable_argsort(T, K, E):
    experts = _experts_with_ties(T, K, E, "cpu")
    order, offsets = kernel_ops.sort_slots(experts, E)
    assert torch.equal(order, torch.argsort(experts.reshape(-1), stable=True))
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long),
                                           torch.bincount(experts.reshape(-1), minlength=E).cumsum(0)]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,K,E", [(1, 1, 3), (300, 2, 8), (100_000, 2, 8), (1000, 4, 5), (64, 2, 1)])
def test_cuda_sort_slots_is_a_stable_argsort(T, K, E):
    """The extension's CUB radix sort against torch's stable argsort (many ties: every expert id repeats)."""
    import mixlora_kernels._C  # noqa: F401

    experts = _experts_with_ties(T, K, E, "cuda")
    order, offsets = torch.ops.mixlora_cuda.sort_slots(experts, E)
    assert torch.equal(order.cpu(), torch.argsort(experts.reshape(-1).cpu(), stable=True))
    assert torch.equal(offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.long),
                                                 torch.bincount(experts.reshape(-1).cpu(), minlength=E).cumsum(0)]))


def test_injected_modules_take_the_models_mode(tmp_path):
    """A model in eval mode (as `from_pretrained` returns it) gets adapters in eval mode: no dropout until .train()."""
    from mixlora import MixLoraModelForCausalLM, save_mixlora

    config = MixLoraConfig(r=4, num_experts=3, lora_dropout=0.5, target_modules=["q_proj", "gate_proj", "down_proj"])
    model = get_mixlora_model(tiny_model("llama"), config)
    assert not any(m.training for m in model.modules())
    randomize_adapters(model)
    tiny_model("llama").save_pretrained(tmp_path / "base")
    config.base_model_name_or_path = str(tmp_path / "base")
    save_mixlora(model, tmp_path / "adapter")
    loaded, _ = MixLoraModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert not any(m.training for m in loaded.modules())
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(input_ids=ids).logits, loaded(input_ids=ids).logits)
