"""Every supported architecture end to end on a tiny random model; the published checkpoint layout; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_adapters, tiny_model
from reference import reference_moe_forward

from mixlora import (MixLoraConfig, MixLoraModelForCausalLM, adapter_state_dict, disable_adapter, get_mixlora_model,
                     inject_adapter_in_model, moe_layers, save_mixlora, unload_mixlora)
from mixlora.checkpoint import read_adapter


def _targets(model, wanted):
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [t for t in wanted if t in names]


WANTED = ["q_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2", "gate_up_proj"]


def test_inject_train_save_load(arch, tmp_path):
    model = tiny_model(arch)
    config = MixLoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, num_experts=4, top_k=2,
                           target_modules=_targets(model, WANTED), base_model_name_or_path=str(tmp_path / "base"))
    model.save_pretrained(tmp_path / "base")
    get_mixlora_model(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {id(p) for n, p in model.named_parameters() if n in trainable} \
        == {id(p) for p in adapter_state_dict(model).values()}  # only adapters train
    assert all(n in model.state_dict() for n in trainable)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.logits).all() and out.aux_loss > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(m.adapters.default.expert_load.sum() == 6 * 18 * 2 for m in moe_layers(model))  # 6 steps x 18 tokens x K slots
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_mixlora(model, tmp_path / "adapter")
    loaded, loaded_config = MixLoraModelForCausalLM.from_pretrained(tmp_path / "adapter", dtype=torch.float32)
    assert loaded_config.to_dict() == config.to_dict()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, logits)
    half = loaded.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for n, p in adapter_state_dict(half).items() if "moe_gate" not in n)
    assert all(m.adapters.default.moe_gate.weight.dtype == torch.float32 for m in moe_layers(half))  # router stays fp32


def _published_checkpoint(num_layers, E, H, I, r, attn):
    """A checkpoint in the published layout, keys written out from docs/algorithm.md §4 (not from our code)."""
    g = torch.Generator().manual_seed(7)
    w = {}
    for i in range(num_layers):
        for p in attn:
            w[f"mixlora.layers.{i}.self_attn.{p}.lora_A.weight"] = torch.randn(r, H, generator=g) * 0.2
            w[f"mixlora.layers.{i}.self_attn.{p}.lora_B.weight"] = torch.randn(H if p != "k_proj" and p != "v_proj"
                                                                               else 16, r, generator=g) * 0.2
        w[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(E, H, generator=g) * 0.3
        for e in range(E):
            for p, (inp, out) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
                w[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.2
                w[f"mixlora.layers.{i}.mlp.{p}.experts.{e}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.2
    return w


PUBLISHED_CONFIG = {"bias": "none", "peft_type": "MIXLORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                    "target_modules": ["q_proj", "v_proj", "gate_proj", "down_proj", "up_proj"],
                    "routing_strategy": "mixlora", "num_experts": 3, "act_fn": "silu", "top_k": 2,
                    "base_model_name_or_path": "tiny-llama", "task_type": "CAUSAL_LM"}


def test_published_checkpoint_loads_and_matches_oracle(tmp_path):
    weights = _published_checkpoint(2, 3, 32, 45, 8, ["q_proj", "v_proj"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    torch.save(weights, tmp_path / "adapter_model.bin")
    config, loaded = read_adapter(tmp_path)
    model = inject_adapter_in_model(tiny_model("llama", torch.float64), config, loaded).eval()
    moe = moe_layers(model)[1]
    assert torch.equal(moe.adapters.default.experts["up_proj"].lora_B[2].float(), weights["mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"])
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    ref, _ = reference_moe_forward(moe, x, "silu")
    assert ((moe(x) - ref).norm() / ref.norm()) <= 1e-9
    # what we write back has exactly the published keys and shapes
    save_mixlora(model, tmp_path / "ours", safe_serialization=False)
    ours = torch.load(tmp_path / "ours" / "adapter_model.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in weights.items()}
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["peft_type"] == "MIXLORA"


def test_legacy_checkpoint_loads(tmp_path):
    weights = _published_checkpoint(2, 3, 32, 45, 8, ["q_proj", "v_proj"])
    legacy = {}
    for k, v in weights.items():
        parts = k.split(".")
        if parts[3] == "mlp" and parts[4] == "moe_gate":
            legacy[f"mixlora.layers.{parts[2]}.gate.weight"] = v
        elif parts[3] == "mlp":  # mixlora.layers.i.mlp.P.experts.e.lora_X.weight -> mixlora.layers.i.experts.e.P...
            legacy[f"mixlora.layers.{parts[2]}.experts.{parts[6]}.{parts[4]}.{parts[7]}.weight"] = v
        else:
            legacy[k] = v
    config = MixLoraConfig.from_dict({**PUBLISHED_CONFIG, "routing_strategy": "mixtral"})
    a = inject_adapter_in_model(tiny_model("llama"), config, weights)
    b = inject_adapter_in_model(tiny_model("llama"), config, legacy)
    for (n, p), (_, q) in zip(adapter_state_dict(a).items(), adapter_state_dict(b).items(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_errors():
    config = MixLoraConfig.from_dict(PUBLISHED_CONFIG)
    weights = _published_checkpoint(2, 3, 32, 45, 8, ["q_proj", "v_proj"])
    missing = {k: v for k, v in weights.items() if "experts.1.lora_A" not in k}
    with pytest.raises(ValueError, match=r"missing.*experts\.1\.lora_A"):
        inject_adapter_in_model(tiny_model("llama"), config, missing)
    wrong = dict(weights)
    wrong["mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"] = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"has shape \(8, 64\) but the model expects \(8, 32\)"):
        inject_adapter_in_model(tiny_model("llama"), config, wrong)


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=4\], got 5"):
        MixLoraConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match=r"target_modules \['fc9'\] match no projection of LlamaForCausalLM"):
        get_mixlora_model(tiny_model("llama"), MixLoraConfig(target_modules=["q_proj", "fc9"]))
    with pytest.raises(ValueError, match=r"\['q_prj', 'gate'\] match no projection of LlamaForCausalLM \('q_prj': did "
                                         r"you mean 'q_proj' or 'v_proj' or 'o_proj'\?; 'gate': did you mean "
                                         r"'gate_proj'\?\); attention projections"):
        get_mixlora_model(tiny_model("llama"), MixLoraConfig(target_modules=["q_prj", "gate"]))

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            block = torch.nn.Module()
            block.self_attn, block.mlp = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.layers = torch.nn.ModuleList([block])

    with pytest.raises(ValueError, match=r"unsupported FFN module Sequential.*supported architectures: llama, mistral"):
        get_mixlora_model(Toy(), MixLoraConfig())
    with pytest.raises(ValueError, match=r"no decoder layers.*supported architectures"):
        get_mixlora_model(torch.nn.Linear(3, 3), MixLoraConfig())
    model = get_mixlora_model(tiny_model("llama"), MixLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has a MixLoRA adapter"):
        get_mixlora_model(model, MixLoraConfig())
    with pytest.raises(ValueError, match=r"activation 'tanh' is not supported"):
        get_mixlora_model(tiny_model("llama"), MixLoraConfig(act_fn="tanh", target_modules=["q_proj"]))


def test_gradient_checkpointing_keeps_aux_loss_gradient():
    config = MixLoraConfig(target_modules=["gate_proj", "down_proj"], num_experts=4, lora_dropout=0.1)
    model = get_mixlora_model(tiny_model("llama"), config)
    randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model.train()
    grads = []
    for kwargs in (None, {"use_reentrant": False}):
        if kwargs:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        torch.manual_seed(0)  # same dropout seeds in both runs; checkpointing replays them in its recompute
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter_state_dict(model).items()})
        model.zero_grad()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_dora_magnitudes_are_trained_saved_and_loaded(tmp_path):
    model = tiny_model("llama")
    config = MixLoraConfig(r=4, num_experts=3, use_dora=True, lora_dropout=0.0, target_modules=["q_proj", "gate_proj",
                                                                                               "down_proj"])
    get_mixlora_model(model, config)
    randomize_adapters(model)
    magnitudes = {n for n, p in model.named_parameters() if n.endswith("lora_magnitude_vector") and p.requires_grad}
    assert len(magnitudes) == 2 * 3  # 2 layers x (q_proj, gate_proj experts, down_proj experts)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(dict(model.named_parameters())[n].grad.abs().sum() > 0 for n in magnitudes)
    model.eval()
    save_mixlora(model, tmp_path)
    config_back, weights = read_adapter(tmp_path)
    assert "mixlora.layers.1.mlp.gate_proj.experts.2.lora_magnitude_vector" in weights
    assert weights["mixlora.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (32,)
    loaded = inject_adapter_in_model(tiny_model("llama"), config_back, weights).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unload_gives_back_the_base_model(arch):
    """unload_mixlora on every architecture: the original module objects, their state-dict keys, the base logits,
    no hooks (no aux loss, labels reach the model's own loss), requires_grad as before; and a second injection."""
    base = tiny_model(arch, torch.float64)
    base.lm_head.weight.requires_grad_(False)  # a base the user froze in part: unloading keeps that
    modules = dict(base.named_modules())
    keys = list(base.state_dict())
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = base(input_ids=ids, labels=ids)
    model = get_mixlora_model(base, MixLoraConfig(target_modules=_targets(base, WANTED), num_experts=3))
    randomize_adapters(model)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, want.logits)
    assert unload_mixlora(model) is base
    assert all(dict(base.named_modules())[n] is m for n, m in modules.items()) and \
        len(dict(base.named_modules())) == len(modules)
    assert list(base.state_dict()) == keys
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not hasattr(base, "mixlora_configs") and not base._forward_hooks and not base._forward_pre_hooks
    with torch.no_grad():
        got = base(input_ids=ids, labels=ids)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss) and "aux_loss" not in got
    get_mixlora_model(base, MixLoraConfig(target_modules=["q_proj"] if "q_proj" in _targets(base, WANTED)
                                          else ["qkv_proj"]))


def test_disable_adapter_runs_the_base_model():
    base = tiny_model("llama", torch.float64)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = get_mixlora_model(base, MixLoraConfig(target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                                                  lora_dropout=0.0))
    randomize_adapters(model)
    model.train()
    with torch.no_grad():
        adapted = model(input_ids=ids, labels=ids)
        with disable_adapter(model):
            off = model(input_ids=ids, labels=ids)
            with disable_adapter(model):  # nesting keeps it off
                pass
            assert torch.equal(model(input_ids=ids).logits, want)
        again = model(input_ids=ids, labels=ids)
    assert torch.equal(off.logits, want) and "aux_loss" not in off
    assert torch.equal(again.logits, adapted.logits) and torch.equal(again.aux_loss, adapted.aux_loss)
    with pytest.raises(ValueError, match="has no MixLoRA adapter"):
        with disable_adapter(tiny_model("llama")):
            pass
