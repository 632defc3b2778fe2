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

from mixlora.checkpoint import read_adapter  # noqa: E402
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
    config, weights = read_adapter(out)
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
    _, w1 = read_adapter(env["out"])
    _, w2 = read_adapter(str(resumed))
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
        return train + ["--num-expert", "4"]
    if case == "config_file":
        (tmp_path / "c.yaml").write_text("lora_dropout: 1.5\n")
        return train + ["--config", str(tmp_path / "c.yaml")]
    if case == "unknown_task":
        cache = os.path.join(os.environ["MIXLORA_CACHE"], "bigbench")
        os.makedirs(cache, exist_ok=True)
        with open(os.path.join(cache, "tasks.json"), "w") as f:  # the task index, so that nothing is downloaded
            json.dump(["social_iqa", "winowhy"], f)
        return ["train", "--base-model", base, "--tasks", "social_iq", "--output-dir", str(tmp_path / "o")]
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
    ("config_key", "unknown config key 'num_expert'; did you mean 'num_experts'?"),
    ("config_file", "MixLoraConfig.lora_dropout"),
    ("unknown_task", "unknown BIG-bench task 'social_iq'; did you mean 'social_iqa'?"),
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
    from mixlora.cli import _read_config_file, build_parser

    args = build_parser().parse_args(["train", "--lr", "1e-3", "--r", "8", "--tasks", "a,b", "--resume"])
    assert (args.lr, args.r, args.tasks, args.resume) == (1e-3, 8, "a,b", True)
    assert not hasattr(args, "steps")  # an option not given leaves the config file's value (or the default)
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5E-4\nadapters:\n  a: {lr: 2e-3}\n")
    assert _read_config_file(str(config)) == {"lr": 5e-4, "adapters": {"a": {"lr": 2e-3}}}


def test_train_help_shows_every_setting_with_its_help_and_default(capsys):
    from dataclasses import fields

    from mixlora.config import MixLoraConfig
    from mixlora.train_config import ADAPTER_FIELDS, TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    shown = [f for f in fields(TrainConfig) if f.name not in ("adapter", "adapters")] + \
        [f for f in fields(MixLoraConfig) if f.name in ADAPTER_FIELDS]
    for f in shown:
        assert f"--{f.name.replace('_', '-')} [VALUE] {f.metadata['help']}" in text, f.name
    assert "--num-experts [VALUE] Number of experts E per MoE layer. (default: 8)" in text  # DEFAULT_ADAPTER's
    assert "--steps [VALUE] optimiser steps (default: 90 on CPU, 600 on GPU)" in text
    assert "--lr [VALUE] AdamW learning rate (default: 0.001)" in text


def test_options_override_the_config_file(tmp_path):
    from mixlora.cli import build_parser, train_settings

    config = tmp_path / "c.yaml"
    config.write_text("steps: 7\nr: 4\nlr: 0.5\n")
    args = build_parser().parse_args(["train", "--config", str(config), "--r", "16", "--output-dir", "o"])
    assert train_settings(args) == {"steps": 7, "r": 16, "lr": 0.5, "output_dir": "o"}


def _one_error_line(capsys) -> str:
    """The single `mixlora: error:` line on stderr (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mixlora: error: ") and err.count("mixlora: error") == 1, err
    return line


def _truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _damage(env, tmp_path, case: str) -> tuple[list[str], str]:
    """A copy of the trained adapter with one bad file, the command that reads it and the text its error must
    hold."""
    from mixlora.checkpoint import write_adapter

    adapter = tmp_path / "adapter"
    shutil.copytree(env["out"], adapter)
    eval_ = ["eval", str(adapter), "--data", env["data"], "--limit", "2"]
    if case == "bin_truncated":
        _truncate(adapter / "adapter_model.bin")
        return eval_, f"{adapter / 'adapter_model.bin'}: is truncated or not a PyTorch file"
    if case == "bin_empty":
        _truncate(adapter / "adapter_model.bin", 0)
        return eval_, f"{adapter / 'adapter_model.bin'}: is empty"
    if case.startswith("safetensors"):
        config, weights = read_adapter(str(adapter))
        write_adapter(str(adapter), config, weights, safe_serialization=True)
        path = adapter / "adapter_model.safetensors"
        if case == "safetensors_truncated":
            _truncate(path)
        else:
            path.write_bytes(os.urandom(4096))
        return eval_, f"{path}: is truncated or not a safetensors file"
    if case == "weights_file_for_dir":
        path = adapter / "adapter_model.bin"
        return ["inspect", str(path)], f"{path}: is a file, not an adapter directory: pass the adapter directory " \
                                       f"{adapter}"
    if case == "config_not_text":
        (adapter / "adapter_config.json").write_bytes(b"\x80\x02" + os.urandom(64))
        return ["generate", str(adapter), "--prompt", "hi"], f"{adapter / 'adapter_config.json'}: is not a text file"
    if case == "summary_not_json":
        (adapter / "train_summary.json").write_text('{"config": ')
        return ["eval", str(adapter)], f"{adapter / 'train_summary.json'}: is not valid JSON"
    if case == "data_not_text":
        data = tmp_path / "data.jsonl"
        data.write_bytes(b'{"question": "\xff\xfe"}\n')
        return ["eval", str(adapter), "--data", str(data)], f"{data}: not UTF-8 text"
    if case == "output_dir_is_file":
        path = tmp_path / "out"
        path.write_text("x")
        argv = [a if a != env["out"] else str(path) for a in env["argv"]]
        return argv, f"{path}: is a file; --output-dir must be a directory"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["bin_truncated", "bin_empty", "safetensors_truncated", "safetensors_garbage",
                                  "weights_file_for_dir", "config_not_text", "summary_not_json", "data_not_text",
                                  "output_dir_is_file"])
def test_bad_file_is_one_line_naming_it_exit_2(env, tmp_path, capsys, case):
    argv, needle = _damage(env, tmp_path, case)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert needle in line, line


def _resumable_copy(env, tmp_path):
    """A copy of the trained run with checkpoints step-000002 and (the same state) step-000003."""
    out = tmp_path / "run"
    shutil.copytree(env["out"], out)
    shutil.copytree(out / "checkpoints" / "step-000002", out / "checkpoints" / "step-000003")
    return out, [a if a != env["out"] else str(out) for a in env["argv"]] + ["--resume"]


def test_resume_names_a_damaged_checkpoint_and_the_intact_earlier_one(env, tmp_path, capsys):
    out, argv = _resumable_copy(env, tmp_path)
    latest = out / "checkpoints" / "step-000003"
    _truncate(latest / "trainer_state.pt")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"{latest}: checkpoint is damaged ({latest / 'trainer_state.pt'}: is truncated" in line, line
    assert f"the earlier checkpoint step-000002 is intact: delete {latest} to resume from it" in line, line
    shutil.rmtree(latest)
    assert main(argv) == 0  # as the message says


def test_resume_says_when_no_checkpoint_is_intact(env, tmp_path, capsys):
    out, argv = _resumable_copy(env, tmp_path)
    _truncate(out / "checkpoints" / "step-000003" / "adapter_model.bin")
    _truncate(out / "checkpoints" / "step-000002" / "trainer_state.pt", 0.9)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "step-000003: checkpoint is damaged" in line and "adapter_model.bin: is truncated" in line, line
    assert "no earlier checkpoint is intact: train again with --overwrite instead of --resume" in line, line


def test_train_refuses_a_non_empty_output_dir_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(env["out"], out)
    stale = out / "checkpoints" / "step-000099"  # a checkpoint of the earlier run that must not survive
    shutil.copytree(out / "checkpoints" / "step-000002", stale)
    (out / "notes.txt").write_text("mine")
    argv = [a if a != env["out"] else str(out) for a in env["argv"]] + ["--save-every", "0"]
    before = open(out / "adapter_model.bin", "rb").read()
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert f"output directory {out} is not empty (adapter_config.json, adapter_model.bin, checkpoints, ...): pass " \
           "--overwrite" in line, line
    assert open(out / "adapter_model.bin", "rb").read() == before  # untouched
    assert main(argv + ["--overwrite"]) == 0
    assert not stale.exists() and not (out / "checkpoints").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not an output of a run: kept
    assert json.load(open(out / "train_summary.json"))["config"]["overwrite"] is True


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_limit_must_be_a_positive_int(env, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", env["out"], "--limit", value])
    assert exit_info.value.code == 2
    assert "argument --limit: " in capsys.readouterr().err


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    code = ("import sys, mixlora.cli as cli\n"
            "try:\n    cli.main(['train', '--num-expert', '4'])\nexcept SystemExit:\n    pass\n"
            "cli.build_parser().format_help()\n"
            "cli.main(['inspect', '/no/such/adapter'])\n"
            "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "did you mean 'num_experts'?" in result.stderr
    assert "adapter directory /no/such/adapter does not exist" in result.stderr


def test_train_summary_has_answer_loss_and_accuracy_intervals(env):
    summary = json.load(open(os.path.join(env["out"], "train_summary.json")))
    held = summary["held_out"]
    assert set(held) == {"animals", "colors", "all"}
    for task in ("animals", "colors"):
        row, before, after = held[task], summary["accuracy"]["before"][task], summary["accuracy"]["after"][task]
        assert row["n"] == 4 and len(before["answer_nll"]) == len(after["answer_nll"]) == 4
        assert row["answer_loss_before"] == pytest.approx(sum(before["answer_nll"]) / 4)
        change = [a - b for a, b in zip(after["answer_nll"], before["answer_nll"], strict=True)]
        assert row["answer_loss_change"] == pytest.approx(sum(change) / 4)
        low, high = row["accuracy_ci95_after"]
        assert 0 <= low <= row["accuracy_after"] <= high <= 1
    assert held["all"]["n"] == 8
    assert summary["commit"] is None or len(summary["commit"]) >= 7


def test_loss_curve_smoothing_is_a_centred_running_mean():
    from mixlora.train_summary import running_mean

    assert running_mean([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert running_mean([4.0, 0.0], 9) == [2.0, 2.0]
