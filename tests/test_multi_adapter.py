"""Several MixLoRA adapters on one frozen base (mixlora.multi) against each adapter trained alone, in float64.

A multi-adapter step must be, adapter by adapter, the step a single-adapter model takes on that adapter's rows:
the rows of a causal LM do not interact, and the combined loss is the sum of the per-adapter losses, so every
gradient, loss and optimizer update must agree up to float64 rounding (the shared GEMMs run on more rows).
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_adapters, tiny_model

from mixlora import MixLoraConfig, MixLoraModelForCausalLM, adapter_state_dict, get_mixlora_model, save_mixlora
from mixlora.multi import adapter_parameters, batch_adapters, get_multi_mixlora_model, save_adapter

REL = 1e-9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _configs(base_path: str | None = None) -> dict[str, MixLoraConfig]:
    common = dict(lora_dropout=0.0, base_model_name_or_path=base_path)
    return {
        # the common case: attention q/v and every FFN projection
        "a": MixLoraConfig(r=8, lora_alpha=16, num_experts=4, top_k=2, router_aux_loss_coef=0.05,
                           target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], **common),
        # K=1, odd E, rsLoRA, z-loss; k/o attention, no gate LoRA (rank-0 stand-in)
        "b": MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=1, use_rslora=True, router_aux_loss_coef=0.1,
                           router_z_loss_coef=0.01, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"],
                           **common),
        # K=E, prime E, R=16; no down LoRA (no down delta for its rows)
        "c": MixLoraConfig(r=16, lora_alpha=16, num_experts=5, top_k=5, router_aux_loss_coef=0.02,
                           target_modules=["q_proj", "gate_proj"], **common),
        # DoRA attention and experts: its rows run the per-expert loop, outside the shared dense GEMMs
        "d": MixLoraConfig(r=4, lora_alpha=8, num_experts=3, top_k=2, use_dora=True, router_aux_loss_coef=0.05,
                           target_modules=["v_proj", "gate_proj", "up_proj", "down_proj"], **common),
    }


ROWS = ["a", "a", "b", "c", "c", "c", "d", "d"]
LR = {"a": 1e-2, "b": 3e-2, "c": 5e-3, "d": 2e-2}


def _batch():
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 96, (len(ROWS), 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in adapter a's rows and c's rows: excluded from LM and aux losses
    mask[5, 6:] = 0
    mask[7, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _spans():
    out = {}
    for i, name in enumerate(ROWS):
        out[name] = (out.get(name, (i, i))[0], i + 1)
    return out


def _models(configs):
    multi = get_multi_mixlora_model(tiny_model("llama", torch.float64), configs)
    randomize_adapters(multi)
    singles = {}
    for name, config in configs.items():
        single = get_mixlora_model(tiny_model("llama", torch.float64), config)
        ours, theirs = adapter_state_dict(multi, name), adapter_state_dict(single)
        assert sorted(ours) == sorted(theirs)
        with torch.no_grad():
            for n, p in theirs.items():
                p.copy_(ours[n])
        singles[name] = single
    return multi, singles


def test_multi_adapter_training_matches_each_adapter_alone():
    configs = _configs()
    multi, singles = _models(configs)
    ids, mask, labels = _batch()
    spans = _spans()
    # one param group per adapter, each with its own learning rate (and its own AdamW state)
    opt = torch.optim.AdamW([{"params": adapter_parameters(multi, n), "lr": LR[n]} for n in configs])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == \
        {id(p) for p in multi.parameters() if p.requires_grad}
    single_opts = {n: torch.optim.AdamW(adapter_state_dict(m).values(), lr=LR[n]) for n, m in singles.items()}
    dense_calls = []
    mlp = multi.model.layers[0].mlp
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.register_forward_hook(lambda mod, inp, out: dense_calls.append(inp[0].shape[0]))
    multi.train()
    for single in singles.values():
        single.train()

    for step in range(3):
        dense_calls.clear()
        with batch_adapters(multi, ROWS):
            out = multi(input_ids=ids, attention_mask=mask, labels=labels)
        # the frozen FFN GEMMs run once per layer, on every token of every LoRA/rsLoRA adapter
        assert dense_calls == [ids[:spans["d"][0]].numel()] * 3
        out.loss.backward()
        assert sorted(out.adapter_losses) == sorted(out.adapter_aux_losses) == sorted(configs)
        total = 0
        for name, single in singles.items():
            r0, r1 = spans[name]
            s_out = single(input_ids=ids[r0:r1], attention_mask=mask[r0:r1], labels=labels[r0:r1])
            s_out.loss.backward()
            lm = single.loss_function(logits=s_out.logits, labels=labels[r0:r1], vocab_size=96)
            assert _rel(out.logits[r0:r1], s_out.logits) <= REL, (step, name)
            assert _rel(out.adapter_losses[name], lm) <= REL, (step, name)
            assert _rel(out.adapter_aux_losses[name], s_out.aux_loss) <= REL and s_out.aux_loss > 0, (step, name)
            total = total + s_out.loss
            ours = adapter_state_dict(multi, name)
            for n, p in adapter_state_dict(single).items():
                assert p.grad.abs().max() > 0, (step, name, n)  # every adapter parameter takes part
                assert _rel(ours[n].grad, p.grad) <= REL, (step, name, n)
        assert _rel(out.loss, total) <= REL
        opt.step()
        opt.zero_grad()
        for name, single_opt in single_opts.items():
            single_opt.step()
            single_opt.zero_grad()
    for name, single in singles.items():
        ours = adapter_state_dict(multi, name)
        for n, p in adapter_state_dict(single).items():
            assert _rel(ours[n], p) <= REL, (name, n)


def test_save_each_adapter_and_reload_single(tmp_path):
    base = tiny_model("llama", torch.float64)
    base.save_pretrained(tmp_path / "base")
    configs = _configs(str(tmp_path / "base"))
    multi, singles = _models(configs)
    ids, mask, _ = _batch()
    spans = _spans()
    with torch.no_grad(), batch_adapters(multi, ROWS):
        logits = multi(input_ids=ids, attention_mask=mask).logits
    for name, single in singles.items():
        save_adapter(multi, name, tmp_path / name, safe_serialization=False)
        save_mixlora(single, tmp_path / f"single_{name}", safe_serialization=False)
        ours = torch.load(tmp_path / name / "adapter_model.bin", weights_only=True)
        theirs = torch.load(tmp_path / f"single_{name}" / "adapter_model.bin", weights_only=True)
        assert sorted(ours) == sorted(theirs)  # exactly the published keys a single-adapter model writes
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert (tmp_path / name / "adapter_config.json").read_text() == \
            (tmp_path / f"single_{name}" / "adapter_config.json").read_text()
        loaded, config = MixLoraModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float64)
        assert config.to_dict() == configs[name].to_dict()
        r0, r1 = spans[name]
        with torch.no_grad():
            ref = loaded.eval()(input_ids=ids[r0:r1], attention_mask=mask[r0:r1]).logits
        assert _rel(logits[r0:r1], ref) <= 1e-12, name


def test_one_adapter_for_the_whole_batch():
    multi, singles = _models(_configs())
    ids, mask, _ = _batch()
    with torch.no_grad():
        with batch_adapters(multi, "b"):  # one name: any batch size (generation)
            whole = multi(input_ids=ids, attention_mask=mask).logits
        with batch_adapters(multi, ["b"] * len(ROWS)):
            rows = multi(input_ids=ids, attention_mask=mask).logits
        ref = singles["b"](input_ids=ids, attention_mask=mask).logits
    assert _rel(whole, ref) <= 1e-12 and _rel(rows, ref) <= 1e-12


def test_errors():
    multi, _ = _models(_configs())
    ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"grouped by adapter \(contiguous\).*'a' has rows 0..0 and again row 2"):
        with batch_adapters(multi, ["a", "b", "a"]):
            pass
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        with batch_adapters(multi, ["a", "zz", "zz"]):
            pass
    with pytest.raises(ValueError, match=r"run it inside `with mixlora.batch_adapters\(model, names\):`"):
        multi(input_ids=ids)
    with pytest.raises(ValueError, match="not a multiple of the 2 rows given to batch_adapters"):
        with batch_adapters(multi, ["a", "b"]):
            multi(input_ids=ids)
    with pytest.raises(ValueError, match="cannot be nested"):
        with batch_adapters(multi, "a"), batch_adapters(multi, "b"):
            pass
    with batch_adapters(multi, ["a", "b", "c"]):  # the failures above left no plan behind
        assert multi(input_ids=ids).logits.shape == (3, 5, 96)
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        adapter_parameters(multi, "zz")
    with pytest.raises(ValueError, match=r"adapter 'x': MixLoraConfig.target_modules \['fc9'\] match no projection"):
        get_multi_mixlora_model(tiny_model("llama"), {"x": MixLoraConfig(target_modules=["fc9"])})
    with pytest.raises(ValueError, match="must be a Python identifier"):
        get_multi_mixlora_model(tiny_model("llama"), {"a.b": MixLoraConfig()})
    with pytest.raises(ValueError, match="already has a MixLoRA adapter"):
        get_multi_mixlora_model(multi, {"d": MixLoraConfig()})
    with pytest.raises(ValueError, match="already has a MixLoRA adapter"):
        get_mixlora_model(multi, MixLoraConfig())
