"""`mixlora export` (mixlora/export.py): the exported MoE checkpoint, loaded by plain transformers in a process that
never imports this package, gives our logits and our greedy tokens.

Tolerances: fp32 ≤ 1e-5 relative (max |Δ| / max |ours|), the issue's bound; observed ≤ 4.2e-7 (the merged
W + sBA rounds once where ours adds W x and s·B(A x) in fp32). fp64 ≤ 1e-6: the targets' softmax runs in fp32 even
in fp64 (observed ≤ 6.5e-8), so this bound catches any merge error above fp32 routing-weight rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import transformers

from conftest import _COMMON, ARCHITECTURES, randomize_adapters, tiny_model
from mixlora import MixLoraConfig, MixLoraModelForCausalLM, get_mixlora_model, save_mixlora
from mixlora.export import FORMATS, NO_TARGET, export_moe

EXPORTABLE = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    # every FFN projection has experts
    "lora": dict(target_modules=ATTENTION + FFN),
    # partially targeted FFN: gate_proj is the bare base in every expert; attention on q/v only
    "rslora": dict(use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    # DoRA on attention and experts, the experts with their own rank and alpha
    "dora": dict(use_dora=True, expert_lora={"r": 3, "lora_alpha": 5}, target_modules=ATTENTION + FFN),
}
DTYPES = {"float32": (torch.float32, 1e-5), "float64": (torch.float64, 1e-6)}
# (variant, dtype) cases per architecture: fp64 for DoRA, the one merge that is not a plain sum
CASES = [(variant, "float32") for variant in VARIANTS] + [("dora", "float64")]
SEQ = 7
# Windows shorter than SEQ, so that the export must carry them: mistral's on every layer, qwen2's on layer 1 only
SLIDING = {"mistral": {"sliding_window": 4},
           "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}}
NEW_TOKENS = 5


def _base_dir(root, arch: str, name: str | None = None, **overrides) -> str:
    """A tiny random base saved as a model directory. I = 48 instead of conftest's 45: transformers' default
    grouped_mm experts need 16-byte row strides (45 works with experts_implementation='eager' only)."""
    config_cls, model_cls, arch_overrides = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **arch_overrides, "intermediate_size": 48, **overrides})
    torch.manual_seed(0)
    path = os.path.join(root, name or f"base-{arch}")
    getattr(transformers, model_cls)(config).eval().save_pretrained(path)
    return path


def _adapter_dir(root, base: str, name: str, **fields) -> str:
    """A random MixLoRA adapter on `base`: B ≠ 0, the LoRA term s·B·A about twice the base weights (std 0.1 against
    the init's 0.02; at conftest's default 0.3 it is 20x and fp32 rounding of the two summation orders alone
    reaches 1e-5), router N(0, 0.1²) so that routing flips need a ~1e-3 logit change, far above fp32 noise."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = MixLoraConfig(**{"r": 4, "lora_alpha": 8, "num_experts": 4, "top_k": 2, "jitter_noise": 0.1,
                              "base_model_name_or_path": base, **fields})
    get_mixlora_model(model, config)
    randomize_adapters(model, std=0.1)
    path = os.path.join(root, name)
    save_mixlora(model, path)
    return path


def _input_ids() -> torch.Tensor:
    return torch.randint(3, _COMMON["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(7))


# Runs in a fresh interpreter: plain transformers only; asserts our package was never imported.
_LOADER = r"""
import json, sys, torch, transformers
cases, ids, out = json.loads(sys.argv[1]), torch.load(sys.argv[2]), {}
for key, (path, dtype) in cases.items():
    dtype = getattr(torch, dtype)
    # grouped_mm (the CPU default) has no fp64 kernel
    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                                    **extra)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=%d, do_sample=False, pad_token_id=0) if dtype == torch.float32 \
            else None
    out[key] = {"class": type(model).__name__, "logits": logits, "tokens": tokens}
assert not [m for m in sys.modules if m.split(".")[0] in ("mixlora", "mixlora_kernels")], "imported mixlora"
torch.save(out, sys.argv[3])
""" % NEW_TOKENS


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every (arch, variant, dtype): ours (logits, greedy tokens) and the export's, loaded in one subprocess."""
    root = tmp_path_factory.mktemp("export")
    ids = _input_ids()
    ours, cases, summaries = {}, {}, {}
    for arch in EXPORTABLE:
        base = _base_dir(root, arch, **SLIDING.get(arch, {}))
        with torch.no_grad():
            ours[arch] = transformers.AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits
        for variant, fields in VARIANTS.items():
            adapter = _adapter_dir(root, base, f"adapter-{arch}-{variant}", **fields)
            for dtype_name in [d for v, d in CASES if v == variant]:
                dtype = DTYPES[dtype_name][0]
                key = f"{arch}-{variant}-{dtype_name}"
                out = os.path.join(root, f"export-{key}")
                summaries[key] = export_moe(adapter, out, dtype=dtype)
                model, _ = MixLoraModelForCausalLM.from_pretrained(adapter, dtype=dtype)
                model.eval()  # from_pretrained leaves the injected adapter modules in training mode
                with torch.no_grad():
                    ours[key] = {"logits": model(input_ids=ids).logits}
                    if dtype == torch.float32:  # our generate is the slow part (per-token op overhead)
                        ours[key]["tokens"] = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                                             pad_token_id=0)
                cases[key] = (out, dtype_name)
    torch.save(ids, root / "ids.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _LOADER, json.dumps(cases), str(root / "ids.pt"), str(root / "theirs.pt")],
                   check=True, cwd=root, env=env)
    return ours, torch.load(root / "theirs.pt"), summaries


@pytest.mark.parametrize("variant, dtype_name", CASES)
@pytest.mark.parametrize("arch", EXPORTABLE)
def test_export_matches_ours(exported, arch, variant, dtype_name):
    ours, theirs, summaries = exported
    key = f"{arch}-{variant}-{dtype_name}"
    expected_class = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM",
                      "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}[arch]
    assert theirs[key]["class"] == expected_class == summaries[key].architecture
    ref, got = ours[key]["logits"], theirs[key]["logits"]
    assert got.dtype == ref.dtype == DTYPES[dtype_name][0]
    error = ((got - ref).abs().max() / ref.abs().max()).item()
    assert error <= DTYPES[dtype_name][1], f"{key}: relative logit error {error:.3g}"
    base = ours[arch].to(ref.dtype)  # the adapter matters: the test would catch an export that drops it
    assert ((base - ref).abs().max() / ref.abs().max()).item() > 0.1
    if "tokens" in ours[key]:
        assert torch.equal(theirs[key]["tokens"], ours[key]["tokens"])


def test_export_writes_a_standard_checkpoint(exported):
    """The published layout engines read (per-expert w1/w2/w3 keys), the config of the target, what was dropped."""
    from safetensors import safe_open

    _, _, summaries = exported
    summary = summaries["llama-dora-float32"]
    out = summary.output_dir
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["MixtralForCausalLM"] and config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["router_jitter_noise"]) == (4, 2, 0.0)
    assert config["hidden_act"] == "silu" and config["dtype"] == "float32"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    with open(os.path.join(summaries["qwen3-lora-float32"].output_dir, "config.json")) as f:
        qwen = json.load(f)
    assert (qwen["norm_topk_prob"], qwen["decoder_sparse_step"], qwen["mlp_only_layers"]) == (True, 1, [])
    assert qwen["moe_intermediate_size"] == 48
    text = str(summary)
    assert "jitter_noise 0.1" in text and "lora_dropout 0.05" in text
    assert f"serve: vllm serve {out}" in text
    assert "the FFN is stored 4 times" in text
    # FFN (3·H·I per layer) stored E times; router E·H per layer; the rest unchanged.
    H, I, L = _COMMON["hidden_size"], 48, _COMMON["num_hidden_layers"]
    assert summary.num_parameters - summary.base_parameters == L * (3 * H * I * 3 + 4 * H)
    assert summary.num_bytes == 4 * summary.num_parameters


def test_export_sharded(tmp_path):
    base = _base_dir(tmp_path, "llama")
    adapter = _adapter_dir(tmp_path, base, "adapter")
    summary = export_moe(adapter, tmp_path / "out", dtype="bfloat16", max_shard_size="60KB")
    assert len(summary.shards) > 1 and os.path.isfile(tmp_path / "out" / "model.safetensors.index.json")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.dtype == torch.bfloat16 and summary.dtype == "bfloat16"


def _moe_model(arch: str, **fields):
    return get_mixlora_model(tiny_model(arch), MixLoraConfig(num_experts=4, top_k=2, **{
        "target_modules": ["fc1", "fc2"] if arch == "phi" else ["qkv_proj", "gate_up_proj"] if arch == "phi3" else
                      ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], **fields}))


@pytest.mark.parametrize("arch", sorted(set(ARCHITECTURES) - set(EXPORTABLE)))
def test_refuses_architectures_without_a_target(tmp_path, arch):
    model_type = tiny_model(arch).config.model_type
    with pytest.raises(ValueError, match=f"a {model_type} base has no exact sparse-MoE target: "
                                         f"{NO_TARGET[model_type][:20]}"):
        export_moe(_moe_model(arch), tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_refuses_gelu_experts(tmp_path):
    # gemma is refused as an architecture (above); a GELU FFN on a Mixtral-shaped base is refused for its activation
    base = _base_dir(tmp_path, "llama", hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ValueError, match="activation is 'gelu_pytorch_tanh', but Mixtral experts are SiLU-gated"):
        export_moe(_adapter_dir(tmp_path, base, "adapter"), tmp_path / "out")
    with pytest.raises(ValueError, match="activation is 'gelu', but Qwen3-MoE experts are SiLU-gated"):
        export_moe(_moe_model("qwen3", act_fn="gelu"), tmp_path / "out")


def test_refuses_attention_biases(tmp_path):
    with pytest.raises(ValueError, match="Mixtral cannot hold a qwen2 base: its attention has q/k/v/o projections "
                                         "without biases or q/k norms, the base's has biases on the q/k/v"):
        export_moe(_moe_model("qwen2"), tmp_path / "out", format="mixtral")
    with pytest.raises(ValueError, match="Qwen3-MoE cannot hold a llama base: its attention has per-head RMSNorm"):
        export_moe(_moe_model("llama"), tmp_path / "out", format="qwen3_moe")
    base = _base_dir(tmp_path, "llama", "base-attention-bias", attention_bias=True)
    with pytest.raises(ValueError, match=r"attention projections have biases \(attention_bias=True\), which "
                                         "Mixtral's attention cannot hold"):
        export_moe(_adapter_dir(tmp_path, base, "adapter"), tmp_path / "out")
    base = _base_dir(tmp_path, "llama", "base-mlp-bias", mlp_bias=True)
    with pytest.raises(ValueError, match=r"FFN projections have biases \(mlp_bias=True\)"):
        export_moe(_adapter_dir(tmp_path, base, "adapter-mlp-bias"), tmp_path / "out")


def test_refuses_mixed_sliding_window_for_qwen3(tmp_path):
    model = tiny_model("qwen3")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    model = get_mixlora_model(model, MixLoraConfig(num_experts=4, top_k=2, target_modules=["gate_proj"]))
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention layers"):
        export_moe(model, tmp_path / "out")


def test_refuses_routing_strategy(tmp_path):
    base = _base_dir(tmp_path, "llama")
    adapter = _adapter_dir(tmp_path, base, "adapter")
    path = os.path.join(adapter, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["routing_strategy"] = "mixlora-switch"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="routing_strategy 'mixlora-switch' has no equivalent in the MoE classes"):
        export_moe(adapter, tmp_path / "out")


def test_refuses_bad_arguments(tmp_path):
    model = _moe_model("llama")
    with pytest.raises(ValueError, match="format must be one of auto, " + ", ".join(FORMATS)):
        export_moe(model, tmp_path / "out", format="dbrx")
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32"):
        export_moe(model, tmp_path / "out", dtype="int8")
    with pytest.raises(ValueError, match="has no MixLoRA adapter"):
        export_moe(tiny_model("llama"), tmp_path / "out")


def test_output_is_atomic(tmp_path, monkeypatch):
    model = _moe_model("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier")
    with pytest.raises(ValueError, match="is not empty: pass --overwrite"):
        export_moe(model, tmp_path / "out")

    def fail(self, directory, **kwargs):
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "model-00001-of-00002.safetensors"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(transformers.MixtralForCausalLM, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        export_moe(model, tmp_path / "out", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]
    monkeypatch.undo()
    export_moe(model, tmp_path / "out", overwrite=True)
    assert "keep.txt" not in os.listdir(tmp_path / "out") and sorted(os.listdir(tmp_path)) == ["out"]


def test_cli_export(tmp_path, capsys):
    from mixlora.cli import main

    base = _base_dir(tmp_path, "qwen3")
    adapter = _adapter_dir(tmp_path, base, "adapter")
    assert main(["export", adapter, "--output", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM (qwen3_moe), bfloat16, E 4, K 2" in out
    assert f"serve: vllm serve {tmp_path / 'out'}" in out and "dropped (training only): lora_dropout" in out
    assert main(["export", adapter, "--output", str(tmp_path / "out2"), "--format", "mixtral"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mixlora: error: export: Mixtral cannot hold a qwen3 base")
    assert not os.path.exists(tmp_path / "out2")
    assert main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "out3")]) == 2
    assert "mixlora: error:" in capsys.readouterr().err


SMOLLM2 = os.path.join(os.path.expanduser("~"), ".cache", "mixlora", "smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason="the converted SmolLM2-135M is not cached")
def test_smollm2_default_adapter_exports(tmp_path):
    """The embedded default: 2 steps of `mixlora train`, export, plain transformers gives our greedy tokens.
    718 s and 950 s wall on the shared 2-core CPU (load average 7-14; about 4 minutes of CPU time), most of it the
    two training steps; the export writes 692 M fp32 parameters (2.77 GB)."""
    from mixlora.train import config_from_dict, train

    started = time.perf_counter()
    train(config_from_dict({"base_model": SMOLLM2, "steps": 2, "eval_size": 0, "output_dir": str(tmp_path / "run")}),
          log=lambda *_: None)
    adapter = str(tmp_path / "run")
    summary = export_moe(adapter, tmp_path / "out", dtype="float32")
    assert summary.architecture == "MixtralForCausalLM" and summary.num_experts == 8
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.chat_template is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    model, _ = MixLoraModelForCausalLM.from_pretrained(adapter)
    model.eval()
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=12, do_sample=False)
    del model
    script = ("import sys, torch, transformers; ids = torch.load(sys.argv[2]); "
              "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
              "out = m.generate(ids, max_new_tokens=12, do_sample=False); "
              "assert not [n for n in sys.modules if n.split('.')[0] == 'mixlora']; torch.save(out, sys.argv[3])")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "out"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "theirs.pt")], check=True, cwd=tmp_path)
    assert torch.equal(torch.load(tmp_path / "theirs.pt"), ours)
    print(f"\n{summary}\nSmolLM2 export round trip: {time.perf_counter() - started:.0f} s")
