"""Evaluation, generation and router inspection for the `mixlora` command.

Multiple-choice accuracy: each choice is scored by the summed log-likelihood of its tokens (`" " + choice`) given
the prompt; the highest score is the prediction. Answer loss: the mean negative log-likelihood per token of the
correct choice's tokens, averaged over the questions (nats). At 25 questions an accuracy carries a 95 % interval
about ±0.2 wide, while the answer loss of the same questions moves by far more than its paired interval when
training changes the model, so both are reported. Inspection: the share of routed slots each expert receives per
layer (padding excluded), the mean per-token router entropy, the experts per token (top-p routing) and the share
of dropped tokens (switch routing), from the router logits of a forward over a dataset.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from mixlora.data import Example, collate, encode
from mixlora.model import adapter_name, batch_adapters, moe_layers

EXPERT_LOAD_PLOT_NAME = "expert_load.png"
Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


@torch.no_grad()
def choice_log_likelihoods(model, tokenizer, examples: list[Example], max_len: int, batch_size: int,
                           bar=None) -> tuple[list[list[float]], list[list[int]]]:
    """Summed log-likelihood of each choice's tokens given the prompt, and the number of those tokens: for each,
    one list per example, in choice order. `bar` (a tqdm bar) advances by one per scored choice.

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
    lengths = [[0] * len(e.choices) for e in examples]
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
            lengths[i][j] = n_answer
        if bar is not None:
            bar.update(len(chunk))
    model.train(was_training)
    return scores, lengths


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / n` (95 % for the default z); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(model, tokenizer, examples_by_task: dict[str, list[Example]], max_len: int, batch_size: int,
             desc: str | None = None) -> dict[str, dict[str, Any]]:
    """Per task, over its multiple-choice examples: {"n": questions, "correct": how many the highest-scored choice
    got right, "accuracy": correct / n, "accuracy_ci95": [low, high] (Wilson), "answer_loss": mean over the
    questions of the mean NLL per token of the correct choice (nats), "answer_nll": that NLL per question, in
    example order}. `desc`: label of a progress bar on stderr (None: no bar)."""
    from tqdm.auto import tqdm

    tasks = {task: [e for e in examples if e.choices] for task, examples in examples_by_task.items()}
    tasks = {task: examples for task, examples in tasks.items() if examples}
    total = sum(len(e.choices) for examples in tasks.values() for e in examples)
    out = {}
    with tqdm(total=total, desc=desc, unit="choice", disable=desc is None, dynamic_ncols=True) as bar:
        for task, examples in tasks.items():
            scores, lengths = choice_log_likelihoods(model, tokenizer, examples, max_len, batch_size, bar)
            correct = sum(max(range(len(s)), key=s.__getitem__) == e.label for s, e in zip(scores, examples))
            nll = [-s[e.label] / max(1, n[e.label]) for s, n, e in zip(scores, lengths, examples)]
            out[task] = {"n": len(examples), "correct": correct, "accuracy": correct / len(examples),
                         "accuracy_ci95": list(wilson_interval(correct, len(examples))),
                         "answer_loss": sum(nll) / len(nll), "answer_nll": nll}
    return out


def _pooled(result: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The entry of all questions of `result` together (each question weighs the same)."""
    n = sum(r["n"] for r in result.values())
    correct = sum(r["correct"] for r in result.values())
    nll = [x for r in result.values() for x in r["answer_nll"]]
    return {"n": n, "correct": correct, "accuracy": correct / n, "accuracy_ci95": list(wilson_interval(correct, n)),
            "answer_loss": sum(nll) / len(nll), "answer_nll": nll}


def _paired_change(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean of after - before over the same questions and the half-width of its 95 % normal interval (nan for one
    question)."""
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, math.nan
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, Z95 * math.sqrt(variance / len(diffs))


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task and for "all" questions together: n, accuracy and answer loss before/after with their intervals,
    and the answer-loss change (after - before, per question) with its paired 95 % interval [low, high]."""
    rows = {task: (before[task], after[task]) for task in after}
    if rows:
        rows["all"] = (_pooled(before), _pooled(after))
    out = {}
    for task, (b, a) in rows.items():
        change, half = _paired_change(b["answer_nll"], a["answer_nll"])
        out[task] = {"n": a["n"],
                     "accuracy_before": b["accuracy"], "accuracy_after": a["accuracy"],
                     "accuracy_ci95_before": b["accuracy_ci95"], "accuracy_ci95_after": a["accuracy_ci95"],
                     "answer_loss_before": b["answer_loss"], "answer_loss_after": a["answer_loss"],
                     "answer_loss_change": change, "answer_loss_change_ci95": [change - half, change + half]}
    return out


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:.2f} [{ci[0]:.2f},{ci[1]:.2f}]"


def format_accuracy_table(before: dict[str, dict[str, Any]] | None, after: dict[str, dict[str, Any]]) -> str:
    """A text table per task (and all questions together): n, the answer loss and the accuracy with its 95 %
    interval; with `before`, both before and after and the loss change with its paired 95 % interval."""
    if not after:
        return "(no multiple-choice examples to evaluate)"
    width = max(len("all"), *(len(t) for t in after))
    if before is None:
        rows = {**after, "all": _pooled(after)}
        lines = [f"{'task':<{width}}  {'n':>4}  {'answer loss':>11}  {'accuracy [95% interval]':>23}"]
        lines += [f"{t:<{width}}  {r['n']:>4}  {r['answer_loss']:>11.3f}  "
                  f"{_interval(r['accuracy'], r['accuracy_ci95']):>23}" for t, r in rows.items()]
        note = "answer loss: mean NLL per token of the correct answer (nats); interval: Wilson"
    else:
        rows = compare(before, after)
        loss_head = "answer loss (nats/token)"
        acc_head = "accuracy [95% interval]"
        lines = [f"{'':<{width}}  {'':>4}  {loss_head:<30}  {acc_head}",
                 f"{'task':<{width}}  {'n':>4}  {'before':>6}  {'after':>6}  {'change ±95%':>14}  "
                 f"{'before':<16}  {'after':<16}"]
        for t, r in rows.items():
            lo, hi = r["answer_loss_change_ci95"]
            change = f"{r['answer_loss_change']:+.3f}±{(hi - lo) / 2:.3f}"
            lines.append(f"{t:<{width}}  {r['n']:>4}  {r['answer_loss_before']:>6.3f}  {r['answer_loss_after']:>6.3f}  "
                         f"{change:>14}  {_interval(r['accuracy_before'], r['accuracy_ci95_before']):<16}  "
                         f"{_interval(r['accuracy_after'], r['accuracy_ci95_after']):<16}")
        note = ("answer loss: mean NLL per token of the correct answer; change: after - before on the same\n"
                "questions with its paired 95% interval (resolved when it excludes 0); accuracy interval: Wilson")
    lines = [line.rstrip() for line in lines]
    rule = "-" * max(len(line) for line in lines)
    header, body = lines[:-len(rows)], lines[-len(rows):]
    return "\n".join([*header, rule, *body[:-1], rule, body[-1], note])


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
def router_statistics(model, tokenizer, examples: list[Example], max_len: int, batch_size: int,
                      desc: str | None = None, adapter: str | None = None) -> dict[str, Any]:
    """Per MoE layer: the share of routed slots each expert got (`load`, (L, E)), the mean per-token router entropy
    in nats (`entropy`, (L,): the entropy of each token's softmax over the E router logits, averaged over tokens),
    the mean number of experts a token was routed to (`experts_per_token`, (L,): K for top-k, varies for top-p)
    and the share of tokens that skipped the experts (`dropped`, (L,): switch routing's capacity overflow, 0 for
    the others), with the token count, from the router logits of forwards over `prompt + answer` of every example,
    routed by the adapter's own strategy; padding tokens are excluded (the `expert_load` buffers count them, so the
    load is recomputed here; they still take switch capacity, as in the forward). `desc`: label of a progress bar
    on stderr (None: no bar). `adapter`: which adapter (default: the model's only one)."""
    from tqdm.auto import tqdm

    model.eval()
    name = adapter_name(model, adapter)
    layers = [moe.adapters[name] for moe in moe_layers(model)]
    config = model.mixlora_configs[name]
    device = next(model.parameters()).device
    E, K = layers[0].num_experts, layers[0].top_k
    counts = torch.zeros(len(layers), E, dtype=torch.float64)
    entropy = torch.zeros(len(layers), dtype=torch.float64)
    routed = torch.zeros(len(layers), dtype=torch.float64)
    dropped = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    sequences = [encode(tokenizer, e.prompt, e.answer, max_len, add_eos=False) for e in examples]
    with tqdm(total=len(sequences), desc=desc, unit="example", disable=desc is None, dynamic_ncols=True) as bar:
        for start in range(0, len(sequences), batch_size):
            batch = collate(sequences[start:start + batch_size], tokenizer.pad_token_id)
            keep = batch["attention_mask"].reshape(-1).bool()
            with batch_adapters(model, name):
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False, logits_to_keep=1)
            seq_len = batch["input_ids"].shape[1]
            for index, moe in enumerate(layers):
                logits = moe.router_logits
                _, experts, kept, _ = moe.select(logits, seq_len)  # the forward's routing, on whole sequences
                experts, kept = experts.cpu()[keep], kept.cpu()[keep]
                probs = torch.softmax(logits.float().cpu()[keep], dim=-1)
                counts[index] += torch.bincount(experts[kept], minlength=E).double()
                routed[index] += kept.sum().double()
                dropped[index] += (~kept.any(dim=-1)).sum().double()
                entropy[index] += -(probs * torch.log(probs.clamp_min(1e-12))).sum().double()
            tokens += int(keep.sum())
            bar.update(len(batch["input_ids"]))
    return {"load": (counts / counts.sum(1, keepdim=True).clamp_min(1)).tolist(),
            "entropy": (entropy / tokens).tolist(), "experts_per_token": (routed / tokens).tolist(),
            "dropped": (dropped / tokens).tolist(), "tokens": tokens, "num_experts": E, "top_k": K,
            "routing": routing_description(config)}


def routing_description(config) -> str:
    """The routing of a `MixLoraConfig` in a few words: "top-2", "top-p 0.8", "switch, capacity 32"."""
    if config.routing_strategy == "mixlora-dynamic":
        return f"top-p {config.top_p:g}" + (f", temperature {config.temperature:g}" if config.temperature else "")
    if config.routing_strategy == "mixlora-switch":
        return f"switch, capacity {config.expert_capacity}"
    return f"top-{config.top_k}"


def format_router_table(stats: dict[str, Any]) -> str:
    """Per layer: each expert's share of the routed slots (an expert that got none reads "idle"), the ratio of the
    busiest to the least busy expert (or how many are idle), the mean per-token router entropy in nats, and for
    top-p routing the mean experts per token, for switch routing the share of dropped tokens."""
    E = stats["num_experts"]
    routing = stats.get("routing", f"top-{stats['top_k']}")
    extra = None
    if routing.startswith("top-p"):
        extra = ("experts/token", [f"{x:.2f}" for x in stats["experts_per_token"]])
    elif routing.startswith("switch"):
        extra = ("dropped", [f"{100 * x:.1f}%" for x in stats["dropped"]])
    header = (f"{'layer':>5}  " + "  ".join(f"{'e' + str(e):>5}" for e in range(E))
              + f"  {'max/min':>7}  {'router entropy':>14}" + (f"  {extra[0]:>13}" if extra else ""))
    lines = [header, "-" * len(header)]
    for layer, (load, ent) in enumerate(zip(stats["load"], stats["entropy"])):
        idle = sum(x == 0 for x in load)
        spread = f"{idle} idle" if idle else f"{max(load) / min(load):.2f}"
        cells = "  ".join("idle".rjust(5) if x == 0 else f"{100 * x:>4.1f}%" for x in load)
        lines.append(f"{layer:>5}  {cells}  {spread:>7}  {ent:>14.3f}" + (f"  {extra[1][layer]:>13}" if extra else ""))
    lines.append("-" * len(header))
    if routing.startswith("top-p"):
        slots = f"routed slots ({routing}: a varying number of experts per token)"
    elif routing.startswith("switch"):
        slots = f"routed tokens ({routing}: one expert per token, dropped tokens skip the experts)"
    else:
        slots = f"{stats['top_k']} routed slots per token"
    lines.append(f"e0..e{E - 1}: share of the {slots} ({stats['tokens']} tokens), uniform = {100 / E:.1f}%")
    lines.append(f"router entropy: mean over tokens of the entropy of the router's softmax, in nats (uniform over "
                 f"{E} experts = ln {E} = {math.log(E):.3f}; one expert = 0)")
    if routing.startswith("top-p"):
        lines.append("experts/token: mean number of experts each token was routed to")
    elif routing.startswith("switch"):
        lines.append("dropped: share of tokens past their expert's capacity in their sequence (their output is "
                     "p_max times their input)")
    return "\n".join(lines)


def plot_expert_load(stats: dict[str, Any], path: str, title: str | None = None) -> None:
    """Heatmap layers x experts of the expert load in %, as a PNG: a diverging colour scale centred on the uniform
    share 100/E % (marked on the colour bar), idle experts crossed out, each cell labelled when the grid is small
    enough to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    from mixlora.fileio import write_file_atomically

    load = 100 * torch.tensor(stats["load"], dtype=torch.float64)
    L, E = load.shape
    uniform = 100 / E
    fig, ax = plt.subplots(figsize=(3.6 + 0.55 * E, 2.0 + 0.24 * L))
    vmax = max(2 * uniform, float(load.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
    image = ax.imshow(load.numpy(), aspect="auto", cmap="RdBu_r", norm=norm)
    if L * E <= 400:
        for layer in range(L):
            for expert in range(E):
                value = float(load[layer, expert])
                dark = not 0.2 < float(norm(value)) < 0.8  # the ends of the colour scale are dark
                ax.text(expert, layer, "idle" if value == 0 else f"{value:.0f}", ha="center", va="center",
                        fontsize=7, color="white" if dark else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(0, L, max(1, L // 10)))
    routing = stats.get("routing", f"top-{stats['top_k']}")
    ax.set_title(title or f"expert load: % of routed slots per layer\n({routing} of {E} experts; white = "
                          f"uniform 1/E = {uniform:.1f}%)", fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("% of routed slots")
    bar.ax.axhline(uniform, color="black", linewidth=2)
    bar.set_ticks([0.0, uniform / 2, uniform, (uniform + vmax) / 2, vmax])
    bar.set_ticklabels(["0", f"{uniform / 2:.1f}", f"1/E = {uniform:.1f}", f"{(uniform + vmax) / 2:.1f}",
                        f"{vmax:.1f}"])
    fig.tight_layout()
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def heatmap_path(adapter_dir: str) -> str:
    return os.path.join(adapter_dir, EXPERT_LOAD_PLOT_NAME)
