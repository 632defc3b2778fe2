"""The `mixlora` command on a tiny random Llama with a word-level tokenizer and tiny JSONL data (seconds, no hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast)

from mixlora.checkpoint import load_adapter  # noqa: E402
from mixlora.cli import main  # noqa: E402

COLORS = ["red", "green", "blue", "yellow"]
ANIMALS = ["cat", "dog", "cow", "owl"]


def _records() -> list[dict]:
    records = []
    for i, color in enumerate(COLORS * 4):
        records.append({"task": "colors", "question": f"the sky {i} is painted", "choices": COLORS, "answer": color})
    for i, animal in enumerate(ANIMALS * 4):
        records.append({"task": "animals", "question": f"which pet number {i}", "choices": ANIMALS, "answer": i % 4})
    return records


def _save_tiny_llama(path, hidden: int = 32) -> None:
    words = sorted({w for r in _records() for w in f"{r['question']} {' '.join(r['choices'])}".split()}
                   | {"Answer:", "hello", "\n"})
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-scoped fixture cannot serve here
        patch.setenv("MIXLORA_CACHE", str(root / "cache"))
        yield _train(root)


def _train(root) -> dict:
    """Train the module's adapter under `root`; what the tests need to know about the run."""
    base, data = root / "base", root / "data.jsonl"
    _save_tiny_llama(base)
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    out = root / "adapter"
    argv = ["train", "--base-model", str(base), "--data", str(data), "--output-dir", str(out), "--steps", "4",
            "--batch-size", "4", "--max-seq-len", "32", "--eval-size", "4", "--save-every", "2",
            "--keep-checkpoints", "0", "--num-experts", "4", "--top-k", "2", "--r", "4", "--seed", "3"]
    assert main(argv) == 0
    return {"root": root, "base": str(base), "data": str(data), "out": str(out), "argv": argv}


def test_train_writes_published_adapter_summary_and_plot(env):
    out = env["out"]
    assert {"adapter_config.json", "adapter_model.bin", "train_summary.json", "loss.png"} <= set(os.listdir(out))
    config, weights = load_adapter(out)
    assert config.peft_type == "MIXLORA" and config.num_experts == 4 and config.top_k == 2 and config.r == 4
    assert config.base_model_name_or_path == env["base"]
    assert "mixlora.layers.1.mlp.moe_gate.weight" in weights
    assert weights["mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight"].shape == (32, 4)
    assert weights["mixlora.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    assert [h["step"] for h in summary["history"]] == [1, 2, 3, 4]
    assert set(summary["accuracy"]["before"]) == set(summary["accuracy"]["after"]) == {"animals", "colors"}
    assert summary["tokens_per_s"] > 0 and summary["device"].startswith("cpu")
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000002"))


def test_resume_continues_with_identical_next_loss(env, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(env["out"], resumed)
    for name in ("adapter_model.bin", "train_summary.json"):
        os.remove(resumed / name)
    argv = [a if a != env["out"] else str(resumed) for a in env["argv"]] + ["--resume"]
    assert main(argv) == 0
    first = json.load(open(os.path.join(env["out"], "train_summary.json")))
    again = json.load(open(resumed / "train_summary.json"))
    assert again["resumed_from_step"] == 2
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]
    _, w1 = load_adapter(env["out"])
    _, w2 = load_adapter(str(resumed))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_seed_makes_runs_deterministic(env, tmp_path):
    other = tmp_path / "again"
    argv = [a if a != env["out"] else str(other) for a in env["argv"]] + ["--save-every", "0"]
    assert main(argv) == 0
    first = json.load(open(os.path.join(env["out"], "train_summary.json")))["history"]
    again = json.load(open(other / "train_summary.json"))["history"]
    assert [h["loss"] for h in again] == [h["loss"] for h in first]


def test_eval_generate_inspect(env, capsys):
    assert main(["eval", env["out"], "--data", env["data"], "--limit", "4"]) == 0
    table = capsys.readouterr().out
    assert "colors" in table and "animals" in table and "accuracy" in table
    assert main(["generate", env["out"], "--prompt", "the sky 1 is painted", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["inspect", env["out"]]) == 0  # data from train_summary.json
    text = capsys.readouterr().out
    assert "entropy" in text and "e3" in text
    assert os.path.getsize(os.path.join(env["out"], "expert_load.png")) > 0


def test_module_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "mixlora", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "inspect" in result.stdout


def _bad(env, tmp_path, case: str) -> list[str]:
    base, data = env["base"], env["data"]
    train = ["train", "--base-model", base, "--data", data, "--output-dir", str(tmp_path / "o"), "--steps", "1"]
    if case == "config_value":
        return train + ["--top-k", "9", "--num-experts", "4"]
    if case == "config_key":
        return train + ["--no-such-key", "1"]
    if case == "config_file":
        (tmp_path / "c.yaml").write_text("lora_dropout: 1.5\n")
        return train + ["--config", str(tmp_path / "c.yaml")]
    if case == "unknown_task":
        cache = os.path.join(os.environ["MIXLORA_CACHE"], "bigbench")
        os.makedirs(cache, exist_ok=True)
        with open(os.path.join(cache, "tasks.json"), "w") as f:  # the task index, so that nothing is downloaded
            json.dump(["social_iqa", "winowhy"], f)
        return ["train", "--base-model", base, "--tasks", "no_such_task", "--output-dir", str(tmp_path / "o")]
    if case == "data_fields":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(_records()[0]) + "\n" + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
        return train[:4] + [str(bad)] + train[5:]
    if case == "architecture":
        gpt2 = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(gpt2)
        shutil.copy(os.path.join(base, "tokenizer.json"), gpt2)
        shutil.copy(os.path.join(base, "tokenizer_config.json"), gpt2)
        return ["train", "--base-model", str(gpt2), "--data", data, "--output-dir", str(tmp_path / "o")]
    if case == "other_base":
        other = tmp_path / "other"
        _save_tiny_llama(other, hidden=48)
        return ["eval", env["out"], "--base-model", str(other), "--data", data]
    raise AssertionError(case)


@pytest.mark.parametrize("case, needle", [
    ("config_value", "MixLoraConfig.top_k"),
    ("config_key", "unknown config key 'no_such_key'"),
    ("config_file", "MixLoraConfig.lora_dropout"),
    ("unknown_task", "known tasks (2): social_iqa, winowhy"),
    ("data_fields", "bad.jsonl: line 2: has fields 'prompt', 'completion'; expected fields instruction/input/output"),
    ("architecture", "supported architectures"),
    ("other_base", "has shape"),
])
def test_bad_input_is_one_line_exit_2(env, tmp_path, capsys, case, needle):
    assert main(_bad(env, tmp_path, case)) == 2
    err = capsys.readouterr().err  # may also hold transformers' progress bars from building the inputs
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mixlora: error: ") and err.count("mixlora: error") == 1, err
    assert needle in line, err


def test_exponent_floats_parse_as_numbers(tmp_path):
    from mixlora.cli import _parse_overrides, _read_config_file

    assert _parse_overrides(["--lr", "1e-3", "--r", "8", "--tasks", "a,b"]) == {"lr": 1e-3, "r": 8, "tasks": "a,b"}
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5E-4\nadapters:\n  a: {lr: 2e-3}\n")
    assert _read_config_file(str(config)) == {"lr": 5e-4, "adapters": {"a": {"lr": 2e-3}}}
