"""MoE-PEFT's routing strategies against oracles written here from their definitions (docs/algorithm.md §1), in
float64: "mixlora-dynamic" (top-p: softmax, optionally divided by the temperature, the most probable experts up to
and including the first at which the cumulative sum exceeds top_p, weights not renormalised) and "mixlora-switch"
(top-1 by argmax; per sequence, a token past the first `expert_capacity` tokens routed to its expert skips the FFN;
output p_max · (FFN_e(x) or x), then output dropout in training; jitter on the router input only).

The oracles loop over tokens and experts in Python and read the parameters directly (from the modules, or from the
checkpoint file), so they share nothing with the code under test but the frozen base weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mixlora import MixLoraConfig, MixLoraModelForCausalLM, adapter_state_dict, get_mixlora_model, moe_layers
from mixlora import save_mixlora
from mixlora.moe import MixLoraSparseMoe
from mixlora.multi import batch_adapters, get_multi_mixlora_model

H, I = 24, 40
FFN = ("gate_proj", "up_proj", "down_proj")
DYNAMIC, SWITCH = "mixlora-dynamic", "mixlora-switch"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# --- the oracles ----------------------------------------------------------------------------------------------------

@dataclass
class Params:
    """What an oracle reads: the frozen FFN weights, the router (E, H) and per projection the expert LoRAs
    (A (E, R, in), B (E, out, R), DoRA magnitudes (E, out) or None), with the scale s."""

    base: dict
    gate: torch.Tensor
    lora: dict
    s: float


def _params(moe, adapter: str = "default") -> Params:
    """The live parameters of one adapter of a MixLoraSparseMoe (gradients flow into them)."""
    ex = moe.adapters[adapter]
    lora = {n: (lo.lora_A, lo.lora_B, lo.lora_magnitude_vector) for n, lo in ex.experts.items()}
    return Params({n: getattr(moe, n).weight for n in FFN}, ex.moe_gate.weight, lora, ex.scaling)


def _expert_ffn(p: Params, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's LoRA FFN on rows x: W2' (silu(W1' x) ⊙ W3' x), W' = W + s B_e A_e (DoRA: m_e / ‖W + s B_e A_e‖_row
    times the LoRA output)."""
    def proj(name, inp):
        W = p.base[name]
        out = inp @ W.T
        if name not in p.lora:
            return out
        A, B, m = p.lora[name]
        out = out + p.s * (inp @ A[e].T) @ B[e].T
        if m is not None:
            out = m[e] / (W + p.s * B[e] @ A[e]).norm(dim=1).detach() * out
        return out

    return proj("down_proj", F.silu(proj("gate_proj", x)) * proj("up_proj", x))


def top_p_oracle(p: Params, x, top_p: float, temperature: float, router_x=None):
    """Returns (output like x, logits (T, E), experts kept per token)."""
    X = x.reshape(-1, x.shape[-1])
    logits = (X if router_x is None else router_x.reshape(X.shape)) @ p.gate.T
    probs = torch.softmax(logits, dim=-1)
    rows, counts = [], []
    for t in range(X.shape[0]):
        q = probs[t] / temperature if temperature > 0 else probs[t]
        ranked = sorted(range(q.numel()), key=lambda e: -q[e].item())
        kept, total = [], 0.0
        for e in ranked:
            kept.append(e)
            total += q[e].item()
            if total > top_p:
                break
        rows.append(sum(q[e] * _expert_ffn(p, e, X[t:t + 1])[0] for e in kept))
        counts.append(len(kept))
    return torch.stack(rows).reshape(x.shape), logits, counts


def switch_oracle(p: Params, x, capacity: int, router_x=None, dropout_keep=None):
    """x (B, S, H) (or (T, H): one sequence). Returns (output like x, logits (T, E), dropped flag per token)."""
    B, S = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.shape[0])
    X = x.reshape(-1, x.shape[-1])
    logits = (X if router_x is None else router_x.reshape(X.shape)) @ p.gate.T
    probs = torch.softmax(logits, dim=-1)
    rows, dropped = [], []
    for b in range(B):
        taken = [0] * p.gate.shape[0]
        for i in range(S):
            t = b * S + i
            e = int(probs[t].argmax())
            taken[e] += 1
            dropped.append(taken[e] > capacity)
            rows.append(probs[t, e] * (X[t] if dropped[-1] else _expert_ffn(p, e, X[t:t + 1])[0]))
    y = torch.stack(rows)
    if dropout_keep is not None:
        y = y * dropout_keep
    return y.reshape(x.shape), logits, dropped


# --- a single MoE layer ---------------------------------------------------------------------------------------------

def _moe(strategy: str, E: int = 4, R: int = 4, use_dora: bool = False, **overrides) -> MixLoraSparseMoe:
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu", num_attention_heads=4)).double()
    config = MixLoraConfig(**{"r": R, "lora_alpha": 2 * R, "num_experts": E, "lora_dropout": 0.0,
                              "target_modules": list(FFN), "routing_strategy": strategy, "use_dora": use_dora,
                              "jitter_noise": 0.0, **overrides})
    moe = MixLoraSparseMoe(mlp, {"default": config}, "silu")
    with torch.no_grad():
        for lora in moe.adapters.default.experts.values():
            lora.lora_B.normal_(std=0.3)
            if lora.lora_magnitude_vector is not None:
                lora.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(lora.lora_magnitude_vector))
        moe.adapters.default.moe_gate.weight.normal_(std=0.5)
    return moe.eval()


def _grads(moe, x, out, seed=11):
    params = [x] + [q for q in moe.parameters() if q.requires_grad]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, params, g)


def _assert_grads_match(moe, x, ours, ref):
    names = ["x"] + [n for n, q in moe.named_parameters() if q.requires_grad]
    assert any(n.endswith("moe_gate.weight") for n in names) and any("lora_A" in n for n in names)
    for name, a, b in zip(names, _grads(moe, x, ours), _grads(moe, x, ref), strict=True):
        if name == "x" or name.endswith("moe_gate.weight"):
            assert b.abs().max() > 0, name  # the router is trained through the weights it gives
        assert _rel(a, b) <= 1e-9, name  # an expert without tokens: both zero


CASES = {
    # name: (strategy, config overrides)
    "top_p": (DYNAMIC, {"top_p": 0.6}),
    "top_p_temperature": (DYNAMIC, {"top_p": 0.7, "temperature": 0.8}),  # p / 0.8 sums to 1.25: weights > 1 in sum
    "top_p_1_keeps_all": (DYNAMIC, {"top_p": 1.0}),
    "switch_overflow": (SWITCH, {"expert_capacity": 1}),  # 6 tokens, 4 experts: at least 2 dropped per sequence
    "switch_within_capacity": (SWITCH, {"expert_capacity": 32}),
}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_output_and_every_gradient_match_the_oracle(case, use_dora):
    strategy, overrides = CASES[case]
    moe = _moe(strategy, use_dora=use_dora, **overrides)
    config = MixLoraConfig(routing_strategy=strategy, **overrides)
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ours = moe(x)
    if strategy == DYNAMIC:
        ref, logits, counts = top_p_oracle(_params(moe), x, config.top_p, config.temperature)
        if case == "top_p_1_keeps_all":
            assert set(counts) == {4}  # every token keeps every expert
        else:
            assert min(counts) < max(counts) and max(counts) > 1, counts  # a varying number of experts per token
        assert moe.adapters.default.expert_load.sum() == sum(counts)  # padding slots of zero weight not counted
        if case == "top_p_temperature":  # the temperature mattered
            assert _rel(ref, top_p_oracle(_params(moe), x, config.top_p, 0.0)[0]) > 1e-3
    else:
        ref, logits, dropped = switch_oracle(_params(moe), x, config.expert_capacity)
        if case == "switch_overflow":
            assert 0 < sum(dropped) < len(dropped)
        else:
            assert not any(dropped)
        assert moe.adapters.default.expert_load.sum() == len(dropped) - sum(dropped)
    assert _rel(moe.adapters.default.router_logits, logits) <= 1e-12
    assert _rel(ours, ref) <= 1e-9
    _assert_grads_match(moe, x, ours, ref)


def test_top_p_selection_edge_cases():
    """The threshold expert is kept; a token whose first expert exceeds top_p keeps it alone; when no cumulative
    sum exceeds top_p (top_p = 1, or temperature > 1 so that p / T sums below top_p) every expert is kept."""
    from mixlora.routing import top_p_selection

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.9, 0.03, 0.02], [0.25, 0.25, 0.25, 0.25]],
                         dtype=torch.float64)
    w, e, kept = top_p_selection(probs, 0.7, 0.0)
    assert kept.sum(-1).tolist() == [2, 1, 3]  # 0.5+0.3 > 0.7 at the 2nd; 0.9 > 0.7 at once; 0.75 > 0.7 at the 3rd
    assert e[0, :2].tolist() == [0, 1] and e[1, 0].item() == 1 and e[2, :3].tolist() == [0, 1, 2]  # ties: lower id
    assert torch.equal(w[0], torch.tensor([0.5, 0.3, 0.0, 0.0], dtype=torch.float64))  # not renormalised
    w, _, kept = top_p_selection(probs, 0.7, 2.0)  # p / 2 sums to 0.5 < 0.7: every expert, weights p / 2
    assert kept.all() and torch.allclose(w.sum(-1), torch.full((3,), 0.5, dtype=torch.float64))
    assert top_p_selection(probs, 1.0)[2].all()


def test_switch_capacity_counts_each_sequence_in_order():
    """Every token prefers expert 0; with capacity 2 the first two tokens of each sequence get its FFN and the rest
    pass p_max · x through. A 2-D input is one sequence."""
    moe = _moe(SWITCH, expert_capacity=2)
    gate = moe.adapters.default.moe_gate.weight
    direction = torch.randn(H, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm()
    with torch.no_grad():
        gate.zero_()
        gate[0] = 8 * direction
    x = 0.1 * torch.randn(2, 5, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + direction
    y = moe(x)
    p = _params(moe)
    probs = torch.softmax(x @ gate.T, dim=-1)
    assert (probs.argmax(-1) == 0).all()
    for b in range(2):
        for i in range(5):
            expected = _expert_ffn(p, 0, x[b, i:i + 1])[0] if i < 2 else x[b, i]
            assert _rel(y[b, i], probs[b, i, 0] * expected) <= 1e-12, (b, i)
    assert moe.adapters.default.expert_load.tolist() == [4, 0, 0, 0]
    flat = moe(x.reshape(10, H))  # one sequence of 10 tokens: only its first two are routed
    assert _rel(flat[:2], y[0, :2]) <= 1e-12
    assert _rel(flat[2:], probs.reshape(10, 4)[2:, :1] * x.reshape(10, H)[2:]) <= 1e-12


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_switch_in_training_jitters_the_router_only_and_drops_out_the_output(use_dora):
    moe = _moe(SWITCH, use_dora=use_dora, expert_capacity=1, jitter_noise=0.2, ffn_dropout=0.3).train()
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    torch.manual_seed(7)
    ours = moe(x)
    torch.manual_seed(7)  # the oracle's draws, in MoE-PEFT's order: the router jitter, then the output dropout
    X = x.detach().reshape(12, H)
    jitter = torch.empty_like(X).uniform_(0.8, 1.2)
    keep = F.dropout(torch.ones_like(X), 0.3, training=True)
    ref, logits, dropped = switch_oracle(_params(moe), x, 1, router_x=x * jitter.reshape(x.shape), dropout_keep=keep)
    assert 0 < sum(dropped) < len(dropped) and (keep == 0).any()
    assert _rel(moe.adapters.default.router_logits, logits) <= 1e-12  # the router saw the jittered x
    assert _rel(ours, ref) <= 1e-9
    # The experts and the passthrough saw x itself: jittering them too gives another output.
    jittered_everywhere = switch_oracle(_params(moe), x * jitter.reshape(x.shape), 1, dropout_keep=keep)[0]
    assert _rel(ref, jittered_everywhere) > 1e-3
    _assert_grads_match(moe, x, ours, ref)


def test_top_p_in_training_jitters_router_and_experts():
    moe = _moe(DYNAMIC, top_p=0.6, jitter_noise=0.2).train()
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    torch.manual_seed(7)
    ours = moe(x)
    torch.manual_seed(7)
    jitter = torch.empty(2, 6, H, dtype=torch.float64).uniform_(0.8, 1.2)
    ref, logits, _ = top_p_oracle(_params(moe), x * jitter, 0.6, 0.0)
    assert _rel(moe.adapters.default.router_logits, logits) <= 1e-12
    assert _rel(ours, ref) <= 1e-9
    assert _rel(ref, top_p_oracle(_params(moe), x, 0.6, 0.0)[0]) > 1e-3  # the jitter mattered
    _assert_grads_match(moe, x, ours, ref)


def test_switch_routes_at_inference():
    """MoE-PEFT's switch layer returns its input unchanged at inference; ours applies the routed formula, without
    jitter and dropout (so eval equals training when both are off)."""
    moe = _moe(SWITCH, expert_capacity=1, jitter_noise=0.3, ffn_dropout=0.5).eval()
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = moe(x)
    ref, _, dropped = switch_oracle(_params(moe), x, 1)
    assert 0 < sum(dropped) < len(dropped)
    assert _rel(y, ref) <= 1e-9
    assert _rel(y, x) > 0.1  # not the input itself
    assert torch.equal(moe(x), y)  # deterministic
    quiet = _moe(SWITCH, expert_capacity=1)
    assert torch.equal(quiet.train()(x), quiet.eval()(x))


# --- the losses -----------------------------------------------------------------------------------------------------

def _softmax(row):
    m = max(row)
    ex = [math.exp(v - m) for v in row]
    return [v / sum(ex) for v in ex], m + math.log(sum(ex))


def _kept_rows(logits_per_layer, mask):
    return [r for logits in logits_per_layer
            for r, keep in zip(logits.tolist(), mask.reshape(-1).tolist(), strict=True) if keep]


def dynamic_loss_oracle(logits_per_layer, mask, top_p, temperature, coef):
    """coef · E · Σ_k Σ_e f_{k,e} P_e over the non-padding rows of all layers; f_{k,e}: share of rows whose k-th
    expert (descending p / temperature) is e and kept, P_e: mean softmax probability."""
    rows = _kept_rows(logits_per_layer, mask)
    N, E = len(rows), len(rows[0])
    f = [[0.0] * E for _ in range(E)]
    P = [0.0] * E
    for r in rows:
        p, _ = _softmax(r)
        q = [v / temperature for v in p] if temperature > 0 else p
        total = 0.0
        for k, e in enumerate(sorted(range(E), key=lambda i: -q[i])):
            f[k][e] += 1 / N
            total += q[e]
            if total > top_p:
                break
        for e in range(E):
            P[e] += p[e] / N
    return coef * E * sum(f[k][e] * P[e] for k in range(E) for e in range(E))


def switch_loss_oracle(logits_per_layer, mask, coef, z_coef):
    """z_coef · mean logsumexp² + coef · E² · mean_e (f_e P_e), f_e: share of rows whose argmax is e."""
    rows = _kept_rows(logits_per_layer, mask)
    N, E = len(rows), len(rows[0])
    f, P, z = [0.0] * E, [0.0] * E, 0.0
    for r in rows:
        p, lse = _softmax(r)
        f[max(range(E), key=lambda i: p[i])] += 1 / N
        for e in range(E):
            P[e] += p[e] / N
        z += lse**2 / N
    return z_coef * z + coef * E**2 * sum(f[e] * P[e] for e in range(E)) / E


@pytest.mark.parametrize("strategy", [DYNAMIC, SWITCH])
def test_losses_match_an_independent_formula(strategy):
    model = tiny_model("llama", torch.float64)
    config = MixLoraConfig(r=4, num_experts=5, routing_strategy=strategy, router_aux_loss_coef=0.07,
                           router_z_loss_coef=0.3 if strategy == SWITCH else 0.0, top_p=0.6, temperature=0.9,
                           expert_capacity=3, jitter_noise=0.0, target_modules=["gate_proj", "down_proj"])
    get_mixlora_model(model, config)
    randomize_adapters(model)
    for moe in moe_layers(model):
        torch.nn.init.normal_(moe.adapters.default.moe_gate.weight, std=2.0)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    logits = [moe.adapters.default.router_logits.detach() for moe in moe_layers(model)]
    if strategy == DYNAMIC:
        ref = dynamic_loss_oracle(logits, mask, 0.6, 0.9, 0.07)
        with_padding = dynamic_loss_oracle(logits, torch.ones_like(mask), 0.6, 0.9, 0.07)
    else:
        ref = switch_loss_oracle(logits, mask, 0.07, 0.3)
        assert switch_loss_oracle(logits, mask, 0.0, 0.3) > 0.1 * ref  # the z-loss is a visible part of it
        with_padding = switch_loss_oracle(logits, torch.ones_like(mask), 0.07, 0.3)
    assert abs(out.aux_loss.item() - ref) <= 1e-12 * ref
    assert abs(with_padding - ref) > 1e-6 * ref  # padding is excluded, and that matters
    lm = model.loss_function(logits=out.logits, labels=ids, vocab_size=96)
    # router_loss: the aux loss joins the loss (transformers' LM loss is fp32, so the sum is rounded to fp32)
    assert _rel(out.loss, lm + out.aux_loss) <= 1e-7
    grad = torch.autograd.grad(out.aux_loss, moe_layers(model)[0].adapters.default.moe_gate.weight)[0]
    assert grad.abs().max() > 0


# --- MoE-PEFT checkpoints -------------------------------------------------------------------------------------------

def moe_peft_reads(config: dict) -> dict:
    """The router settings MoE-PEFT 2.0.2's `MixLoraConfig.from_config` takes from an adapter_config.json (its
    defaults for absent keys), after the type assertions of its `check()`."""
    strategy = config["routing_strategy"]
    out = {"routing_strategy": strategy, "num_experts": config["num_experts"], "r": config["r"],
           "lora_alpha": config["lora_alpha"], "lora_dropout": config["lora_dropout"],
           "router_aux_loss_coef": config.get("router_aux_loss_coef", 0.001),
           "router_loss": config.get("router_loss", True), "act_fn": config.get("act_fn")}
    if strategy == DYNAMIC:
        out.update(router_init_range=config.get("router_init_range", 0.02),
                   jitter_noise=config.get("jitter_noise", 0.0), top_p=config.get("top_p", 0.8),
                   temperature=config.get("temperature", 0.0))
        assert isinstance(out["top_p"], float) and 0 < out["top_p"] <= 1
        assert isinstance(out["temperature"], float) and out["temperature"] >= 0
    else:
        out.update(router_init_range=config.get("router_init_range", 1.0),
                   jitter_noise=config.get("jitter_noise", 0.01),
                   router_z_loss_coef=config.get("router_z_loss_coef", 0.001),
                   expert_capacity=config.get("expert_capacity", 32), ffn_dropout=config.get("ffn_dropout", 0.0),
                   sparse_step=config.get("sparse_step"))
        assert isinstance(out["router_z_loss_coef"], float) and out["router_z_loss_coef"] >= 0
        assert out["sparse_step"] is None or (isinstance(out["sparse_step"], int) and out["sparse_step"] > 0)
        assert isinstance(out["expert_capacity"], int) and out["expert_capacity"] > 0
        assert isinstance(out["ffn_dropout"], float) and out["ffn_dropout"] >= 0
    assert isinstance(out["r"], int) and isinstance(out["lora_alpha"], int) and isinstance(out["lora_dropout"], float)
    assert isinstance(out["router_aux_loss_coef"], float) and isinstance(out["router_init_range"], float)
    assert isinstance(out["jitter_noise"], float) and isinstance(out["router_loss"], bool)
    assert isinstance(out["num_experts"], int) and out["num_experts"] > 0
    return out


# What MoE-PEFT's export writes per strategy (it writes no router coefficients: they take its defaults).
MOE_PEFT_STRATEGY_KEYS = {DYNAMIC: {"top_p": 0.55, "temperature": 0.0},
                          SWITCH: {"expert_capacity": 3, "sparse_step": None}}
E_FILE, R_FILE, LAYERS = 4, 4, 2
SHAPES = {"gate_proj": (45, 32), "up_proj": (45, 32), "down_proj": (32, 45)}  # (out, in) of the tiny llama


def _moe_peft_checkpoint(path, strategy: str) -> dict:
    """An adapter directory as MoE-PEFT writes it: the published keys (one fp32 tensor per expert) in a torch.save
    .bin, and its exported JSON. Returns the weights."""
    gen = torch.Generator().manual_seed(3)
    weights = {}
    for i in range(LAYERS):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E_FILE, 32, generator=gen)
        for name, (out, inp) in SHAPES.items():
            for e in range(E_FILE):
                prefix = f"mixlora.layers.{i}.mlp.{name}.experts.{e}"
                weights[f"{prefix}.lora_A.weight"] = 0.3 * torch.randn(R_FILE, inp, generator=gen)
                weights[f"{prefix}.lora_B.weight"] = 0.3 * torch.randn(out, R_FILE, generator=gen)
    path.mkdir()
    torch.save(weights, path / "adapter_model.bin")
    config = {"bias": "none", "peft_type": "MIXLORA", "r": R_FILE, "lora_alpha": 8, "lora_dropout": 0.05,
              "target_modules": list(FFN), "routing_strategy": strategy, "num_experts": E_FILE,
              **MOE_PEFT_STRATEGY_KEYS[strategy]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return weights


def _file_params(moe, weights: dict, layer: int) -> Params:
    lora = {}
    for name in FFN:
        prefix = f"mixlora.layers.{layer}.mlp.{name}.experts"
        lora[name] = (torch.stack([weights[f"{prefix}.{e}.lora_A.weight"] for e in range(E_FILE)]).double(),
                      torch.stack([weights[f"{prefix}.{e}.lora_B.weight"] for e in range(E_FILE)]).double(), None)
    return Params({n: getattr(moe, n).weight for n in FFN},
                  weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"].double(), lora, 8 / R_FILE)


@pytest.mark.parametrize("strategy", [DYNAMIC, SWITCH])
def test_moe_peft_checkpoint_loads_and_gives_the_oracle_output(tmp_path, strategy, monkeypatch):
    base = tiny_model("llama", torch.float64)
    base.save_pretrained(tmp_path / "base")
    weights = _moe_peft_checkpoint(tmp_path / "adapter", strategy)
    model, config = MixLoraModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float64,
                                                            base_model_name_or_path=str(tmp_path / "base"))
    expected = moe_peft_reads(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()))
    # MoE-PEFT's defaults for absent keys, but the aux-loss coefficient: ours is the paper's 0.01, MoE-PEFT's 0.001.
    expected.pop("router_aux_loss_coef")
    assert {key: getattr(config, key) for key in expected} == expected
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    layer_of = {id(moe): i for i, moe in enumerate(moe_layers(model))}
    dropped = []

    def oracle_forward(self, h):
        p = _file_params(self, weights, layer_of[id(self)])
        if strategy == DYNAMIC:
            return top_p_oracle(p, h, config.top_p, config.temperature)[0]
        y, _, d = switch_oracle(p, h, config.expert_capacity)
        dropped.extend(d)
        return y

    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(MixLoraSparseMoe, "forward", oracle_forward)
        ref = model(input_ids=ids).logits
    assert _rel(ours, ref) <= 1e-9
    if strategy == SWITCH:
        assert 0 < sum(dropped) < len(dropped)  # capacity 3 of 8-token sequences overflows
    # What we save is that layout: the same keys and tensors, and a JSON MoE-PEFT reads to the same settings.
    save_mixlora(model, tmp_path / "saved", safe_serialization=False)
    saved = torch.load(tmp_path / "saved" / "adapter_model.bin", weights_only=True)
    assert sorted(saved) == sorted(weights)
    assert all(torch.equal(saved[k].float(), weights[k]) for k in weights)
    written = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert moe_peft_reads(written) == {**expected, "router_aux_loss_coef": 0.01}
    for key, value in MOE_PEFT_STRATEGY_KEYS[strategy].items():
        assert written[key] == value and type(written[key]) is type(value)


# --- several adapters, one per strategy -----------------------------------------------------------------------------

def _multi_configs() -> dict[str, MixLoraConfig]:
    common = dict(lora_dropout=0.0, jitter_noise=0.0, router_aux_loss_coef=0.05)
    return {
        "topk": MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2,
                              target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], **common),
        "dyn": MixLoraConfig(r=4, lora_alpha=8, num_experts=4, routing_strategy=DYNAMIC, top_p=0.6, temperature=0.9,
                             use_rslora=True, target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"], **common),
        "sw": MixLoraConfig(r=8, lora_alpha=8, num_experts=3, routing_strategy=SWITCH, expert_capacity=3,
                            router_z_loss_coef=0.01, target_modules=["gate_proj", "up_proj", "down_proj"], **common),
        "dyn_dora": MixLoraConfig(r=4, lora_alpha=8, num_experts=3, routing_strategy=DYNAMIC, top_p=0.5,
                                  use_dora=True, target_modules=["gate_proj", "up_proj", "down_proj"], **common),
        "sw_dora": MixLoraConfig(r=4, lora_alpha=8, num_experts=4, routing_strategy=SWITCH, expert_capacity=2,
                                 use_dora=True, target_modules=["gate_proj", "down_proj"], **common),
    }


ROWS = ["topk", "dyn", "dyn", "sw", "sw", "dyn_dora", "sw_dora", "sw_dora"]


def test_one_adapter_per_strategy_in_one_model_equals_each_alone():
    configs = _multi_configs()
    multi = get_multi_mixlora_model(tiny_model("llama", torch.float64), configs)
    randomize_adapters(multi)
    singles = {}
    for name, config in configs.items():
        single = get_mixlora_model(tiny_model("llama", torch.float64), config)
        with torch.no_grad():
            ours = adapter_state_dict(multi, name)
            for n, q in adapter_state_dict(single).items():
                q.copy_(ours[n])
        singles[name] = single.train()
    multi.train()
    ids = torch.randint(0, 96, (len(ROWS), 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    mask[4, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with batch_adapters(multi, ROWS):
        out = multi(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    tokens = {name: ROWS.count(name) * 9 for name in configs}
    load = {name: sum(int(m.adapters[name].expert_load.sum()) for m in moe_layers(multi)) for name in configs}
    assert load["sw"] < LAYERS * tokens["sw"] and load["sw_dora"] < LAYERS * tokens["sw_dora"]  # tokens dropped
    assert LAYERS * tokens["dyn"] < load["dyn"] < LAYERS * 4 * tokens["dyn"]  # more than one expert, not all
    for name, single in singles.items():
        r0, r1 = ROWS.index(name), len(ROWS) - ROWS[::-1].index(name)
        s_out = single(input_ids=ids[r0:r1], attention_mask=mask[r0:r1], labels=labels[r0:r1])
        s_out.loss.backward()
        lm = single.loss_function(logits=s_out.logits, labels=labels[r0:r1], vocab_size=96)
        assert _rel(out.logits[r0:r1], s_out.logits) <= 1e-9, name
        assert _rel(out.adapter_losses[name], lm) <= 1e-9, name
        assert _rel(out.adapter_aux_losses[name], s_out.aux_loss) <= 1e-9 and s_out.aux_loss > 0, name
        ours = adapter_state_dict(multi, name)
        for n, q in adapter_state_dict(single).items():
            assert q.grad.abs().max() > 0, (name, n)
            assert _rel(ours[n].grad, q.grad) <= 1e-9, (name, n)


@pytest.mark.parametrize("strategy", [DYNAMIC, SWITCH])
def test_export_refuses_the_strategy_and_says_why(tmp_path, strategy):
    from mixlora.export import export_moe

    model = get_mixlora_model(tiny_model("llama"), MixLoraConfig(num_experts=4, routing_strategy=strategy,
                                                                 target_modules=["gate_proj"]))
    why = "varying number of experts" if strategy == DYNAMIC else "per-sequence capacity"
    with pytest.raises(ValueError, match=f"routing_strategy '{strategy}' has no equivalent in the MoE classes of "
                                         f"transformers .*{why}.*only 'mixlora' \\(top-k\\) exports"):
        export_moe(model, tmp_path / "model")
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    model.mixlora_configs["default"].base_model_name_or_path = str(base)
    save_mixlora(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=f"routing_strategy '{strategy}' has no equivalent.*{why}"):
        export_moe(tmp_path / "adapter", tmp_path / "dir")
    assert not (tmp_path / "model").exists() and not (tmp_path / "dir").exists()
