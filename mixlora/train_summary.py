"""What a `mixlora train` run reports: the history entries, `train_summary.json`, the log lines and `loss.png`.

A run of one adapter writes its fields at the top level (as before several adapters could be trained together);
a run of several nests them per adapter name under "adapters" (`nested`).
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from mixlora.fileio import write_file_atomically

# Smoothing of the loss curve: 9 steps average out most of the per-batch noise of 4-sequence batches and still
# follow the fall over a 90-step run.
LOSS_SMOOTHING_WINDOW = 9
_TAIL = 5  # the final loss is the mean of this many last steps


def history_entry(step: int, losses: dict[str, dict[str, float]], nested: bool) -> dict[str, Any]:
    """The history entry of `step`: losses is name -> {loss, aux_loss, lr}."""
    if nested:
        return {"step": step, "adapters": losses}
    (only,) = losses.values()
    return {"step": step, **only}


def adapter_history(history: list[dict[str, Any]], name: str, nested: bool) -> list[dict[str, Any]]:
    """One adapter's history entries {step, loss, aux_loss, lr}."""
    return [{"step": h["step"], **h["adapters"][name]} for h in history] if nested else history


def loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    tail = history[-min(_TAIL, len(history)):]
    return {"first_loss": history[0]["loss"] if history else None,
            "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
            "final_aux_loss": sum(h["aux_loss"] for h in tail) / len(tail) if tail else None}


def loss_line(summary: dict[str, Any], steps: int) -> str:
    return (f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} (mean of last {min(_TAIL, steps)} "
            f"steps), aux {summary['final_aux_loss']:.4f}")


def git_commit() -> str | None:
    """The short git commit of this package's checkout (with "+changes" when the tree has uncommitted changes to
    tracked files), or None when it is not in a git checkout or git is not installed."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", here, "diff", "--quiet", "HEAD"], capture_output=True)
    except FileNotFoundError:  # no git executable: the commit is optional information
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode == 1 else "")


def plot_title(summary: dict[str, Any], configs: dict[str, Any], nested: bool) -> str:
    """Two lines: base model, E/K/R (or the adapters), steps, commit and date; the held-out answer loss."""
    if nested:
        setup = ", ".join(f"{n} (E {c.num_experts}, K {c.top_k}, R {c.r})" for n, c in configs.items())
        held = None
    else:
        (c,) = configs.values()
        setup = f"E {c.num_experts}, K {c.top_k}, R {c.r}"
        held = summary["held_out"].get("all")
    first = (f"{os.path.basename(os.path.normpath(summary['base_model']))} · {setup} · {summary['steps']} steps · "
             f"{summary['commit'] or 'no commit'} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    if held is None:
        return first
    return (f"{first}\nheld-out answer loss {held['answer_loss_before']:.3f} → {held['answer_loss_after']:.3f} "
            f"nats/token over {held['n']} questions")


def running_mean(values: list[float], window: int) -> list[float]:
    """Centred running mean over `window` points (odd), shrinking to the points there are at both ends. Centred,
    not trailing like an EMA, so that the curve does not lag behind a loss that falls fast."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def plot_losses(history: list[dict[str, Any]], path: str, title: str | None = None) -> None:
    """The loss curves of `history` as a PNG: the LM loss per step (points) with its running mean (line), the router
    aux loss on its own axis below; one colour per adapter for a multi-adapter history. `title`: run information."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, aux_ax) = plt.subplots(2, 1, figsize=(7, 4.8), sharex=True, height_ratios=[3, 1.2])
    steps = [h["step"] for h in history]
    if history and "adapters" in history[0]:
        curves = {name: [h["adapters"][name] for h in history] for name in history[0]["adapters"]}
    else:
        curves = {None: history}
    for name, entries in curves.items():
        label = "LM loss (answer tokens)" if name is None else f"{name}: LM loss"
        losses = [e["loss"] for e in entries]
        points = ax.scatter(steps, losses, s=8, alpha=0.35, label=f"{label}, per step")
        ax.plot(steps, running_mean(losses, LOSS_SMOOTHING_WINDOW), color=points.get_facecolor()[0][:3],
                linewidth=2, label=f"{label}, running mean of {LOSS_SMOOTHING_WINDOW} steps")
        aux_ax.plot(steps, [e["aux_loss"] for e in entries], color=points.get_facecolor()[0][:3], linewidth=1,
                    label="router aux loss" if name is None else f"{name}: router aux loss")
    ax.set_ylabel("LM loss (nats/token)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    aux_ax.set_xlabel("step")
    aux_ax.set_ylabel("aux loss")
    aux_ax.legend(fontsize=7)
    aux_ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    write_file_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
