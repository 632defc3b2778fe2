"""`mixlora train` with several adapters (`adapters:` in the config file) on the tiny model of test_cli (seconds)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

pytest.importorskip("tokenizers")
from test_cli import _records, _save_tiny_llama

from mixlora.checkpoint import read_adapter
from mixlora.cli import main
from mixlora.model import MixLoraModelForCausalLM

# name -> (task of test_cli's records, adapter settings): different E, K and R.
ADAPTERS = {"colors": ("colors", {"num_experts": 4, "top_k": 2, "r": 4}),
            "animals": ("animals", {"num_experts": 2, "top_k": 1, "r": 2, "lr": 0.02})}


def _config(root, **adapters) -> str:
    path = root / "multi.yaml"
    path.write_text(yaml.safe_dump({"steps": 6, "batch_size": 4, "max_seq_len": 32, "eval_size": 4, "save_every": 3,
                                    "keep_checkpoints": 0, "seed": 3, "lr": 0.01, "adapters": adapters}))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_multi")
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the function-scoped fixture cannot serve here
        patch.setenv("MIXLORA_CACHE", str(root / "cache"))
        yield _train(root)


def _train(root) -> dict:
    """Train the module's adapter under `root`; what the tests need to know about the run."""
    base = root / "base"
    _save_tiny_llama(base)
    adapters = {}
    for name, (task, settings) in ADAPTERS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in _records() if r["task"] == task))
        adapters[name] = {"data": str(data), **settings}
    out = root / "out"
    argv = ["train", "--config", _config(root, **adapters), "--base-model", str(base), "--output-dir", str(out)]
    assert main(argv) == 0
    return {"root": root, "base": str(base), "out": str(out), "argv": argv, "adapters": adapters}


def test_adapters_train_together_and_save_published(env):
    out = env["out"]
    assert {"colors", "animals", "train_summary.json", "loss.png"} <= set(os.listdir(out))
    summary = json.load(open(os.path.join(out, "train_summary.json")))
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    for name, (task, settings) in ADAPTERS.items():
        directory = os.path.join(out, name)
        assert {"adapter_config.json", "adapter_model.bin"} <= set(os.listdir(directory))
        config, weights = read_adapter(directory)
        assert (config.num_experts, config.top_k, config.r) == (settings["num_experts"], settings["top_k"],
                                                                 settings["r"])
        assert config.base_model_name_or_path == env["base"]
        assert weights[f"mixlora.layers.0.mlp.down_proj.experts.{settings['num_experts'] - 1}.lora_B.weight"].shape \
            == (32, settings["r"])
        model, _ = MixLoraModelForCausalLM.from_pretrained(directory)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()

        s = summary["adapters"][name]
        assert s["lr"] == settings.get("lr", 0.01)
        assert s["final_loss"] < s["first_loss"], s
        assert s["final_aux_loss"] > 0
        assert set(s["accuracy"]["before"]) == set(s["accuracy"]["after"]) == {task}  # its own held-out split
        assert [h["step"] for h in summary["history"]] == list(range(1, 7))
        losses = [h["adapters"][name]["loss"] for h in summary["history"]]
        assert all(torch.isfinite(torch.tensor(losses)))
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-000003", "animals"))


def test_resume_continues_with_identical_losses(env, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(env["out"], resumed)
    os.remove(resumed / "train_summary.json")
    for name in ADAPTERS:
        os.remove(resumed / name / "adapter_model.bin")
    argv = [a if a != env["out"] else str(resumed) for a in env["argv"]] + ["--resume"]
    assert main(argv) == 0
    first = json.load(open(os.path.join(env["out"], "train_summary.json")))
    again = json.load(open(resumed / "train_summary.json"))
    assert again["resumed_from_step"] == 3
    assert again["history"] == first["history"]  # losses, aux losses and learning rates of every adapter
    for name in ADAPTERS:
        _, w1 = read_adapter(os.path.join(env["out"], name))
        _, w2 = read_adapter(str(resumed / name))
        assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_eval_finds_the_adapter_data_in_the_run_summary(env, capsys):
    assert main(["eval", os.path.join(env["out"], "animals"), "--max-seq-len", "32"]) == 0
    table = capsys.readouterr().out
    assert "animals" in table and "colors" not in table


@pytest.mark.parametrize("case, needle", [
    ("unknown_field", "adapter 'animals': unknown key 'num_expert'; did you mean 'num_experts'?"),
    ("bad_value", "adapter 'colors': MixLoraConfig.top_k must be in [1, num_experts=4], got 5"),
    ("no_data", "adapter 'animals' has no data: give it 'data'"),
])
def test_bad_adapter_is_one_line_exit_2(env, tmp_path, capsys, case, needle):
    adapters = {name: dict(spec) for name, spec in env["adapters"].items()}
    if case == "unknown_field":
        adapters["animals"]["num_expert"] = 2
    elif case == "bad_value":
        adapters["colors"]["top_k"] = 5
    else:
        del adapters["animals"]["data"]
    argv = ["train", "--config", _config(tmp_path, **adapters), "--base-model", env["base"],
            "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("mixlora: error: ") and err.count("mixlora: error") == 1, err
    assert needle in line, err
