"""A quantized frozen base (QLoRA style, bitsandbytes 4-bit NF4/FP4 and 8-bit) under MixLoRA, on the CPU.

The oracle of a quantized layer is the weight it computes with: bitsandbytes' dequantized 4-bit weight, or the 8-bit
layer's weight read back by running it on the identity (W_q = layer(I)ᵀ, bias removed). A MixLoRA model over the
quantized base must equal the same MixLoRA model over a float base holding those weights (4-bit layers compute in
fp32 here; 8-bit layers cast their input to fp16, hence the looser bound there, still far below what the adapters
change).
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mixlora import (MixLoraConfig, MixLoraModelForCausalLM, adapter_state_dict, disable_adapter,  # noqa: E402
                     get_mixlora_model, save_mixlora)
from mixlora.base_models import quantization_config  # noqa: E402

QUANT = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}
# Relative error bound against the float oracle: fp32 arithmetic in another order (4-bit); fp16 inputs (8-bit).
REL = {"nf4": 1e-5, "fp4": 1e-5, "int8": 2e-2}
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose linear layers are at least one 4-bit block (64) wide: bitsandbytes' CPU inference path
    (eval, no grad) repacks the weights per block and fails on narrower ones."""
    path = tmp_path_factory.mktemp("quantized") / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    return str(path)


def _quantized(base_dir, kind):
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANT[kind], device_map={"": "cpu"})


def _float_twin(base_dir, quantized):
    """The float model whose every linear layer holds the weight its quantized twin computes with."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for name, q in quantized.named_modules():
            if isinstance(q, bnb.nn.Linear4bit):
                layers[name].weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):
                out = q(torch.eye(q.in_features, dtype=torch.float32)).float()
                layers[name].weight.copy_((out if q.bias is None else out - q.bias).T)
    return model


def _same_adapters(src, dst):
    ours, theirs = adapter_state_dict(src), adapter_state_dict(dst)
    with torch.no_grad():
        for n, p in theirs.items():
            p.copy_(ours[n])


@pytest.mark.parametrize("kind", sorted(QUANT))
def test_mixlora_on_a_quantized_base_matches_its_float_oracle(base_dir, kind):
    config = MixLoraConfig(r=4, num_experts=3, top_k=2, lora_dropout=0.0, target_modules=TARGETS,
                           router_aux_loss_coef=0.05)
    quantized = _quantized(base_dir, kind)
    twin = _float_twin(base_dir, quantized)
    assert isinstance(quantized.model.layers[0].mlp.gate_proj, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    model = get_mixlora_model(quantized, config)
    oracle = get_mixlora_model(twin, config)
    randomize_adapters(model)
    _same_adapters(model, oracle)
    assert all(p.dtype == torch.float32 for p in adapter_state_dict(model).values())  # in the compute dtype
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # an evaluation first (as `mixlora train` does): the layers must stay trainable after it
        model.eval()(input_ids=ids)
    model.train(), oracle.train()
    out, ref = model(input_ids=ids, labels=ids), oracle(input_ids=ids, labels=ids)
    with torch.no_grad(), disable_adapter(model):
        plain = model(input_ids=ids).logits
    assert _rel(out.logits, ref.logits) <= REL[kind] < _rel(plain, ref.logits) / 10  # the adapters matter
    assert _rel(out.aux_loss, ref.aux_loss) <= REL[kind]
    out.loss.backward()
    ref.loss.backward()
    theirs = adapter_state_dict(oracle)
    for n, p in adapter_state_dict(model).items():
        assert _rel(p.grad, theirs[n].grad) <= 10 * REL[kind], n  # a gradient is a difference: 10x the bound


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_train_save_and_reload_onto_a_freshly_quantized_base(base_dir, tmp_path, kind):
    config = MixLoraConfig(r=8, num_experts=4, top_k=2, lora_dropout=0.0, target_modules=TARGETS,
                           base_model_name_or_path=base_dir)
    model = get_mixlora_model(_quantized(base_dir, kind), config)
    opt = torch.optim.AdamW(adapter_state_dict(model).values(), lr=1e-2)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(6):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_mixlora(model, tmp_path / "adapter")
    loaded, _ = MixLoraModelForCausalLM.from_pretrained(tmp_path / "adapter", quantization_config=QUANT[kind],
                                                        device_map={"": "cpu"})
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, logits)


def test_dora_over_a_quantized_base_is_refused(base_dir):
    with pytest.raises(ValueError, match=r"MixLoraConfig.use_dora: DoRA needs the frozen weights' row norms, and "
                                         r"\['down_proj', 'gate_proj', 'up_proj'\] are quantized \(Linear4bit\)"):
        get_mixlora_model(_quantized(base_dir, "nf4"), MixLoraConfig(use_dora=True, target_modules=["gate_proj"]))
    with pytest.raises(ValueError, match=r"\['q_proj'\] are quantized"):
        get_mixlora_model(_quantized(base_dir, "nf4"), MixLoraConfig(use_dora=True, target_modules=["q_proj"],
                                                                     expert_lora={"use_dora": False}))


def test_quantization_config_of_the_train_options():
    four = quantization_config(4, torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config(8).load_in_8bit and quantization_config(None) is None
    with pytest.raises(ValueError, match="4 or 8 bits"):
        quantization_config(3)


def test_mixlora_train_on_a_4bit_base(tmp_path, monkeypatch):
    """`mixlora train --load-in-4bit`: the run trains (loss falls), records the option, and its adapter reloads
    onto a freshly quantized base with the logits of the trained model."""
    import json

    from test_cli import _records, _save_tiny_llama

    from mixlora.train import TrainConfig, fit

    monkeypatch.setenv("MIXLORA_CACHE", str(tmp_path / "cache"))
    base, data = tmp_path / "base", tmp_path / "data.jsonl"
    _save_tiny_llama(base, hidden=64)  # one 4-bit block wide (see base_dir)
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    cfg = TrainConfig(base_model=str(base), data=str(data), output_dir=str(tmp_path / "out"), steps=12,
                      batch_size=4, max_seq_len=32, eval_size=4, save_every=0, lr=1e-2, load_in_4bit=True,
                      adapter={"num_experts": 4, "top_k": 2, "r": 4, "lora_dropout": 0.0})
    model, _, summary = fit(cfg, log=lambda line: None)
    assert isinstance(model.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.1, losses
    assert summary["config"]["load_in_4bit"] is True
    ids = torch.randint(3, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    loaded, _ = MixLoraModelForCausalLM.from_pretrained(tmp_path / "out", device_map={"": "cpu"},
                                                        quantization_config=quantization_config(4, torch.float32))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, logits)
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit are exclusive"):
        TrainConfig(load_in_4bit=True, load_in_8bit=True).resolved()
