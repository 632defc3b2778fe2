"""Evaluation, generation and router inspection for the `mixlora` command.

Multiple-choice accuracy: each choice is scored by the summed log-likelihood of its tokens (`" " + choice`) given
the prompt; the highest score is the prediction. Inspection: the share of routed slots each expert receives per
layer (padding excluded) and the mean router entropy, from the router logits of a forward over a dataset.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from mixlora.data import Example, collate, encode
from mixlora.model import moe_layers

EXPERT_LOAD_PLOT_NAME = "expert_load.png"


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, examples: list[Example], max_len: int,
                           batch_size: int) -> list[list[float]]:
    """Summed log-likelihood of each choice's tokens given the prompt: one list per example, in choice order.

    Sequences are left-padded (with explicit position ids) so that all answer tokens sit at the end and only the
    last `max answer length + 1` positions go through the LM head (`logits_to_keep`).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    items = []
    for i, example in enumerate(examples):
        for j, choice in enumerate(example.choices):
            ids, n_prompt = encode(tokenizer, example.prompt, choice, max_len, add_eos=False)
            items.append((len(ids), i, j, ids, n_prompt))
    items.sort(key=lambda item: item[0])
    scores = [[0.0] * len(e.choices) for e in examples]
    pad = tokenizer.pad_token_id
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        width = max(item[0] for item in chunk)
        keep = max(len(item[3]) - item[4] for item in chunk) + 1
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (n, _, _, ids, _) in enumerate(chunk):
            input_ids[row, width - n:] = torch.tensor(ids)
            mask[row, width - n:] = 1
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), logits_to_keep=keep, use_cache=False)
        logprobs = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # predicts the last keep-1 tokens
        targets = input_ids[:, width - keep + 1:].to(device)
        token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for row, (n, i, j, ids, n_prompt) in enumerate(chunk):
            n_answer = n - n_prompt
            scores[i][j] = float(token_lp[row, keep - 1 - n_answer:].sum())
    model.train(was_training)
    return scores


def accuracy(model, tokenizer, examples_by_task: dict[str, list[Example]], max_len: int,
             batch_size: int) -> dict[str, dict[str, float]]:
    """{task: {"n": examples, "accuracy": fraction correct}} over multiple-choice examples."""
    out = {}
    for task, examples in examples_by_task.items():
        examples = [e for e in examples if e.choices]
        if not examples:
            continue
        scores = choice_log_likelihoods(model, tokenizer, examples, max_len, batch_size)
        correct = sum(max(range(len(s)), key=s.__getitem__) == e.label for s, e in zip(scores, examples))
        out[task] = {"n": len(examples), "accuracy": correct / len(examples)}
    return out


def _mean_accuracy(result: dict[str, dict[str, float]]) -> float:
    return sum(r["accuracy"] for r in result.values()) / len(result)


def format_accuracy_table(before: dict[str, dict[str, float]] | None, after: dict[str, dict[str, float]]) -> str:
    """A text table: task, n, accuracy (and before / change when `before` is given), with a mean row."""
    if not after:
        return "(no multiple-choice examples to evaluate)"
    tasks = list(after)
    width = max(len("mean"), *(len(t) for t in tasks))
    if before is None:
        lines = [f"{'task':<{width}}  {'n':>5}  {'accuracy':>8}"]
        lines += [f"{t:<{width}}  {after[t]['n']:>5}  {after[t]['accuracy']:>8.3f}" for t in tasks]
        lines.append(f"{'mean':<{width}}  {sum(after[t]['n'] for t in tasks):>5}  {_mean_accuracy(after):>8.3f}")
    else:
        lines = [f"{'task':<{width}}  {'n':>5}  {'before':>7}  {'after':>7}  {'change':>7}"]
        for t in tasks:
            b, a = before[t]["accuracy"], after[t]["accuracy"]
            lines.append(f"{t:<{width}}  {after[t]['n']:>5}  {b:>7.3f}  {a:>7.3f}  {a - b:>+7.3f}")
        b, a = _mean_accuracy(before), _mean_accuracy(after)
        lines.append(f"{'mean':<{width}}  {sum(after[t]['n'] for t in tasks):>5}  {b:>7.3f}  {a:>7.3f}  {a - b:>+7.3f}")
    rule = "-" * len(lines[0])
    return "\n".join([lines[0], rule, *lines[1:-1], rule, lines[-1]])


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy generation with the KV cache; the prompt goes through the chat template when the tokenizer has one."""
    model.eval()
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def router_statistics(model, tokenizer, examples: list[Example], max_len: int, batch_size: int) -> dict[str, Any]:
    """Per MoE layer: the share of routed slots each expert got (`load`, (L, E)), the mean router entropy in nats
    (`entropy`, (L,)) and the token count, from the router logits of forwards over `prompt + answer` of every
    example; padding tokens are excluded (the `expert_load` buffers count them, so the load is recomputed here)."""
    model.eval()
    layers = moe_layers(model)
    device = next(model.parameters()).device
    E, K = layers[0].num_experts, layers[0].top_k
    counts = torch.zeros(len(layers), E, dtype=torch.float64)
    entropy = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    sequences = [encode(tokenizer, e.prompt, e.answer, max_len, add_eos=False) for e in examples]
    for start in range(0, len(sequences), batch_size):
        batch = collate(sequences[start:start + batch_size], tokenizer.pad_token_id)
        keep = batch["attention_mask"].reshape(-1).bool()
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
              use_cache=False, logits_to_keep=1)
        for index, moe in enumerate(layers):
            logits = moe.router_logits.float().cpu()[keep]
            probs = torch.softmax(logits, dim=-1)
            chosen = torch.topk(probs, K, dim=-1).indices.reshape(-1)
            counts[index] += torch.bincount(chosen, minlength=E).double()
            entropy[index] += -(probs * torch.log(probs.clamp_min(1e-12))).sum().double()
        tokens += int(keep.sum())
    return {"load": (counts / counts.sum(1, keepdim=True)).tolist(), "entropy": (entropy / tokens).tolist(),
            "tokens": tokens, "num_experts": E, "top_k": K}


def format_router_table(stats: dict[str, Any]) -> str:
    E = stats["num_experts"]
    header = f"{'layer':>5}  " + "  ".join(f"{'e' + str(e):>5}" for e in range(E)) + f"  {'entropy':>7}  {'max/min':>7}"
    lines = [header, "-" * len(header)]
    for layer, (load, ent) in enumerate(zip(stats["load"], stats["entropy"])):
        ratio = max(load) / min(load) if min(load) > 0 else math.inf
        lines.append(f"{layer:>5}  " + "  ".join(f"{100 * x:>4.1f}%" for x in load) + f"  {ent:>7.3f}  {ratio:>7.2f}")
    lines.append("-" * len(header))
    lines.append(f"expert load = share of the {stats['top_k']} routed slots per token ({stats['tokens']} tokens); "
                 f"uniform = {100 / E:.1f}%; entropy in nats (uniform = ln {E} = {math.log(E):.3f})")
    return "\n".join(lines)


def plot_expert_load(stats: dict[str, Any], path: str) -> None:
    """Heatmap layers x experts of the expert load, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mixlora.config import write_file_atomically

    load = stats["load"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * stats["num_experts"], 1.2 + 0.22 * len(load)))
    image = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(stats["num_experts"]))
    ax.set_title("expert load (share of routed slots)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def heatmap_path(adapter_dir: str) -> str:
    return os.path.join(adapter_dir, EXPERT_LOAD_PLOT_NAME)
