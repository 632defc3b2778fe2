"""Held-out metrics of `mixlora train`/`eval` against an independent computation, and the readable router table."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tokenizers")
from test_cli import _records, _save_tiny_llama  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from mixlora import MixLoraConfig, get_mixlora_model  # noqa: E402
from mixlora.data import Example, format_prompt  # noqa: E402
from mixlora.data import encode  # noqa: E402
from mixlora.evaluate import accuracy, compare, format_accuracy_table, format_router_table, wilson_interval  # noqa
from mixlora.evaluate import router_statistics  # noqa: E402
from mixlora.model import moe_layers  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    _save_tiny_llama(path)
    return path


def _tiny_model(path, **config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    model = get_mixlora_model(model, MixLoraConfig(**{"num_experts": 4, "top_k": 2, "r": 4, "lora_dropout": 0.0,
                                                      **config}))
    with torch.no_grad():  # random B so that the experts change the logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return _tiny_model(tiny_dir)


def _examples() -> dict[str, list[Example]]:
    out = {}
    for r in _records()[::3]:
        label = r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])
        out.setdefault(r["task"], []).append(Example(r["task"], format_prompt(r["question"]), r["choices"][label],
                                                     r["choices"], label))
    return out


def _reference(model, tokenizer, example: Example) -> tuple[list[float], list[int]]:
    """Summed log-prob and token count of each choice: one unpadded forward per choice, no logits_to_keep."""
    sums, counts = [], []
    for choice in example.choices:
        prompt = tokenizer(example.prompt)["input_ids"]
        answer = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        sums.append(sum(float(logprobs[len(prompt) + k - 1, t]) for k, t in enumerate(answer)))
        counts.append(len(answer))
    return sums, counts


def test_accuracy_and_answer_loss_match_an_independent_computation(tiny):
    model, tokenizer = tiny
    examples = _examples()
    result = accuracy(model, tokenizer, examples, max_len=64, batch_size=5)  # batches mix lengths: padding matters
    for task, task_examples in examples.items():
        correct, nll = 0, []
        for e in task_examples:
            sums, counts = _reference(model, tokenizer, e)
            correct += max(range(len(sums)), key=sums.__getitem__) == e.label
            nll.append(-sums[e.label] / counts[e.label])
        r = result[task]
        assert r["n"] == len(task_examples) and r["correct"] == correct
        assert r["accuracy"] == correct / len(task_examples)
        assert r["answer_nll"] == pytest.approx(nll, rel=1e-4)
        assert r["answer_loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
        assert r["accuracy_ci95"] == list(wilson_interval(correct, len(task_examples)))


def test_wilson_interval_known_values():
    # 0 of 10: the upper bound is z²/(n + z²); 50 of 100: ±0.0962 (textbook values).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 1.959964 ** 2 / (10 + 1.959964 ** 2)))
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(11, 25) == pytest.approx((0.2667, 0.6293), abs=1e-4)


def test_compare_pairs_the_questions():
    before = {"t": {"n": 3, "correct": 1, "accuracy": 1 / 3, "accuracy_ci95": [0.1, 0.8], "answer_loss": 2.0,
                    "answer_nll": [1.0, 2.0, 3.0]}}
    after = {"t": {"n": 3, "correct": 2, "accuracy": 2 / 3, "accuracy_ci95": [0.2, 0.9], "answer_loss": 1.0,
                   "answer_nll": [0.5, 1.0, 1.5]}}
    row = compare(before, after)["t"]
    diffs = [-0.5, -1.0, -1.5]
    sd = math.sqrt(sum((d + 1.0) ** 2 for d in diffs) / 2)
    assert row["answer_loss_change"] == pytest.approx(-1.0)
    assert row["answer_loss_change_ci95"] == pytest.approx([-1.0 - 1.959964 * sd / math.sqrt(3),
                                                            -1.0 + 1.959964 * sd / math.sqrt(3)])
    table = format_accuracy_table(before, after)
    assert "-1.000±0.566" in table and "0.33 [0.10,0.80]" in table and "0.67 [0.20,0.90]" in table


def test_router_table_labels_entropy_and_shows_idle_experts():
    stats = {"load": [[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], "entropy": [0.5, 1.3], "tokens": 10,
             "num_experts": 4, "top_k": 2}
    table = format_router_table(stats)
    assert "inf" not in table
    rows = table.splitlines()
    assert "router entropy" in rows[0]
    assert rows[2].split() == ["0", "50.0%", "50.0%", "idle", "idle", "2", "idle", "0.500"]
    assert rows[3].split() == ["1", "25.0%", "25.0%", "25.0%", "25.0%", "1.00", "1.300"]
    assert "in nats (uniform over 4 experts = ln 4 = 1.386" in table


def test_router_table_of_top_p_and_switch_routing():
    common = {"load": [[0.5, 0.5, 0.0, 0.0]], "entropy": [0.5], "tokens": 10, "num_experts": 4, "top_k": 2}
    table = format_router_table({**common, "routing": "top-p 0.8", "experts_per_token": [1.75], "dropped": [0.0]})
    rows = table.splitlines()
    assert rows[0].split()[-1] == "experts/token" and rows[2].split()[-1] == "1.75"
    assert "share of the routed slots (top-p 0.8: a varying number of experts per token)" in table
    table = format_router_table({**common, "routing": "switch, capacity 32", "experts_per_token": [0.9],
                                 "dropped": [0.1]})
    rows = table.splitlines()
    assert rows[0].split()[-1] == "dropped" and rows[2].split()[-1] == "10.0%"
    assert "routed tokens (switch, capacity 32: one expert per token" in table


def _selection_reference(model, tokenizer, examples, config):
    """Per layer: tokens routed to each expert, kept slots, dropped tokens, from one unpadded forward per example
    and the strategy's rule written out per token (top-p: descending probability until the cumulative sum exceeds
    top_p; switch: argmax, the first `expert_capacity` tokens per expert of the sequence)."""
    layers = [moe.adapters["default"] for moe in moe_layers(model)]
    E = config.num_experts
    counts = [[0] * E for _ in layers]
    kept = [0] * len(layers)
    dropped = [0] * len(layers)
    tokens = 0
    for e in examples:
        ids, _ = encode(tokenizer, e.prompt, e.answer, 64, add_eos=False)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False)
        tokens += len(ids)
        for index, moe in enumerate(layers):
            taken = [0] * E
            for row in torch.softmax(moe.router_logits.double(), dim=-1).tolist():
                ranked = sorted(range(E), key=lambda i: -row[i])
                if config.routing_strategy == "mixlora-dynamic":
                    total = 0.0
                    for expert in ranked:
                        counts[index][expert] += 1
                        kept[index] += 1
                        total += row[expert]
                        if total > config.top_p:
                            break
                else:
                    taken[ranked[0]] += 1
                    if taken[ranked[0]] <= config.expert_capacity:
                        counts[index][ranked[0]] += 1
                        kept[index] += 1
                    else:
                        dropped[index] += 1
    load = [[c / sum(row) for c in row] for row in counts]
    return load, [k / tokens for k in kept], [d / tokens for d in dropped], tokens


@pytest.mark.parametrize("strategy", ["mixlora-dynamic", "mixlora-switch"])
def test_router_statistics_follow_the_strategy(tiny_dir, strategy):
    model, tokenizer = _tiny_model(tiny_dir, routing_strategy=strategy, top_p=0.6, expert_capacity=2)
    examples = [e for task in _examples().values() for e in task][:7]
    stats = router_statistics(model, tokenizer, examples, max_len=64, batch_size=3)  # right padding in batches
    config = model.mixlora_configs["default"]
    load, per_token, dropped, tokens = _selection_reference(model, tokenizer, examples, config)
    assert stats["tokens"] == tokens
    assert [x for row in stats["load"] for x in row] == pytest.approx([x for row in load for x in row], abs=1e-12)
    assert stats["experts_per_token"] == pytest.approx(per_token, abs=1e-12)
    assert stats["dropped"] == pytest.approx(dropped, abs=1e-12)
    if strategy == "mixlora-dynamic":
        assert stats["routing"] == "top-p 0.6" and all(1 < k < 4 for k in per_token)
    else:
        assert stats["routing"] == "switch, capacity 2" and all(0 < d < 1 for d in dropped)
    table = format_router_table(stats)
    assert ("experts/token" if strategy == "mixlora-dynamic" else "dropped") in table.splitlines()[0]
