"""Fine-tuning a base model with a MixLoRA adapter: the `mixlora train` loop, and `MixLoraTrainer` for HF Trainer.

`train(TrainConfig)` trains the adapter parameters only (router, attention LoRA, expert LoRA) with AdamW on the
answer tokens (prompt masked), the router aux loss included, and writes into `output_dir`:
    adapter_config.json, adapter_model.bin     the adapter in the published format (`save_mixlora`)
    train_summary.json                         config, losses, per-task held-out accuracy (Wilson 95 % interval) and
                                               answer loss before/after ("held_out": paired change), commit, time,
                                               device, tokens/s
    loss.png                                   LM loss per step with its running mean, aux loss, run information
    checkpoints/step-NNNNNN/                   adapter + trainer_state.pt (optimizer, scheduler, RNG, step, history)
Batches are a pure function of (seed, step), and the RNG state is checkpointed, so `resume=True` continues from the
latest checkpoint with the same next loss as an uninterrupted run.

With `adapters` (name -> {MixLoraConfig fields, data and/or tasks, optionally lr}) several adapters train together
on one frozen base (`mixlora.get_multi_mixlora_model`): each step takes `batch_size` rows of every adapter's data,
grouped by adapter, in one forward/backward; AdamW has one param group per adapter (its own lr; two with LoRA+) and clipping is per
adapter, so each adapter gets the update it would get trained alone on the same rows (dropout draws aside). Each
adapter is written to `output_dir/<name>/` in the published format (checkpoints hold one such directory per
adapter), `train_summary.json` has the per-adapter losses and accuracies under "adapters", and `loss.png` one curve
per adapter.

A non-empty `output_dir` is refused unless `overwrite` (the earlier run's outputs are removed) or `resume`.

`MixLoraTrainer` (defined in `mixlora.hf_trainer`, loaded from here on first use) is `transformers.Trainer` whose
saves (`save_model`, checkpoints) write the adapter only, in the published format, instead of the full model that
`PreTrainedModel.save_pretrained` would write; it also resumes from such checkpoints. The aux loss needs nothing
special: the MixLoRA model adds it to `loss` itself.

The settings live in `mixlora.train_config`, the reporting (summary, log lines, loss plot) in `mixlora.train_summary`.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from mixlora.config import MixLoraConfig
from mixlora.fileio import write_json_atomically
from mixlora.train_config import DEFAULT_TASKS, TrainConfig, config_dict, config_from_dict
from mixlora.train_state import LOSS_PLOT_NAME, SUMMARY_NAME, latest_checkpoint, prepare_output_dir, resume_state, \
    rng_state, save_checkpoint, set_rng_state
from mixlora.train_summary import adapter_history, git_commit, history_entry, loss_line, loss_summary, plot_losses, \
    plot_title

# torch, transformers and the model modules are imported inside the functions that use them: `mixlora --help` and
# the argument checks should answer before torch (1-2 s) and transformers (several s) have loaded.

__all__ = ["DEFAULT_TASKS", "TrainConfig", "config_from_dict", "fit", "latest_checkpoint", "train"]


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of step `step`: consecutive slices of per-epoch permutations (a function of seed and step)."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        order = list(range(n))
        random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def _lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))
    return factor


@dataclass
class _Run:
    """One adapter being trained: its name in the model, config, learning rate and data. `subdir`: saved under
    `<root>/<name>` (a run of several adapters), else into `<root>` itself."""

    name: str
    config: MixLoraConfig
    lr: float
    train: list
    eval: dict
    subdir: bool
    params: list = field(default_factory=list)
    sequences: list = field(default_factory=list)

    def directory(self, root: str) -> str:
        """Where this adapter is saved under `root` (an output or checkpoint directory)."""
        return os.path.join(root, self.name) if self.subdir else root

    def save(self, model, root: str) -> None:
        from mixlora.model import save_mixlora

        save_mixlora(model, self.directory(root), safe_serialization=False, adapter=self.name)

    def describe(self) -> str:
        c = self.config
        return (f"E {c.num_experts}, K {c.top_k}, R {c.r}, lr {self.lr:g}; {len(self.train)} training examples, "
                f"{sum(len(v) for v in self.eval.values())} held out; {sum(p.numel() for p in self.params):,} "
                "trainable parameters")


def _load_runs(cfg: TrainConfig, base: str) -> list[_Run]:
    """The adapter(s) of a resolved config with their train/held-out data; errors name the adapter."""
    from mixlora.data import load_examples, split_examples
    from mixlora.model import DEFAULT_ADAPTER_NAME

    nested = cfg.adapters is not None
    specs = cfg.adapters or {DEFAULT_ADAPTER_NAME: {"data": cfg.data, "tasks": cfg.tasks, "lr": cfg.lr,
                                                    "adapter": cfg.adapter}}
    runs = []
    for name, spec in specs.items():
        try:
            config = MixLoraConfig.from_dict({**spec["adapter"], "base_model_name_or_path": base})
            grouped = load_examples(spec["data"], spec["tasks"])
            train_examples, eval_examples = split_examples(grouped, cfg.eval_size, cfg.train_size, cfg.seed)
            if not train_examples:
                raise ValueError("no training examples left after holding out the evaluation examples")
        except ValueError as e:
            if not nested:
                raise
            raise ValueError(f"adapter {name!r}: {e}") from None
        runs.append(_Run(name, config, spec["lr"], train_examples, eval_examples, subdir=nested))
    return runs


def _evaluate(model, tokenizer, runs: list[_Run], cfg: TrainConfig, when: str) -> dict[str, Any]:
    """Adapter name -> per-task accuracy and answer loss on its held-out examples (`evaluate.accuracy`). `when`
    labels the progress bar ("before", "after")."""
    from mixlora.evaluate import accuracy
    from mixlora.model import batch_adapters

    out = {}
    for run in runs:
        with batch_adapters(model, run.name):
            desc = f"eval {when}" if len(runs) == 1 else f"eval {when} ({run.name})"
            out[run.name] = accuracy(model, tokenizer, run.eval, cfg.max_seq_len, cfg.eval_batch_size, desc)
    return out


def _adapter_summary(run: _Run, history: list[dict[str, Any]], before, after) -> dict[str, Any]:
    from mixlora.evaluate import compare

    return {"adapter_config": run.config.to_dict(), "lr": run.lr, "train_examples": len(run.train),
            "eval_examples": {task: len(v) for task, v in run.eval.items()}, **loss_summary(history),
            "accuracy": {"before": before, "after": after}, "held_out": compare(before, after)}


def train(config: TrainConfig, log=print) -> dict[str, Any]:
    """Run `mixlora train`; returns the summary that is also written to `train_summary.json`."""
    return fit(config, log)[2]


def fit(config: TrainConfig, log=print):
    """`train`, returning (trained MixLoRA model, tokenizer, summary). The model holds one adapter per run (named
    "default" without `adapters`)."""
    import torch
    from tqdm.auto import tqdm

    from mixlora.base_models import load_base, resolve_base_model
    from mixlora.data import collate, encode
    from mixlora.evaluate import format_accuracy_table
    from mixlora.model import adapter_parameters, batch_adapters, get_multi_mixlora_model, set_adapter_weights
    from mixlora.optim import adapter_param_groups

    started = time.perf_counter()
    cfg = config.resolved()
    prepare_output_dir(cfg)
    base = resolve_base_model(cfg.base_model)
    runs = _load_runs(cfg, base)
    nested = cfg.adapters is not None

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_base(base, dtype=dtype, device=cfg.device, bits=cfg.bits)
    _seed_all(cfg.seed)
    get_multi_mixlora_model(model, {run.name: run.config for run in runs})
    for run in runs:
        run.params = adapter_parameters(model, run.name)
        run.sequences = [encode(tokenizer, e.prompt, e.answer, cfg.max_seq_len, add_eos=True) for e in run.train]
    # One parameter group per adapter (its own lr), two with LoRA+ (its B at lr · loraplus_lr_ratio).
    optimizer = torch.optim.AdamW([g for run in runs for g in adapter_param_groups(model, run.lr, run.name)],
                                  lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.steps, warmup))
    base_note = f"{base} ({cfg.bits}-bit)" if cfg.bits else base
    if nested:
        log(f"base model {base_note}; device {cfg.device}; {len(runs)} adapters trained together, {cfg.batch_size} "
            "sequences of each per step:")
        for run in runs:
            log(f"  {run.name}: {run.describe()}")
    else:
        log(f"base model {base_note}; device {cfg.device}; {runs[0].describe()}")

    start_step, history, before, tokens, train_time = 0, [], None, 0, 0.0
    subdirs = [run.directory("") for run in runs]
    checkpoint, state, checkpoint_weights = resume_state(cfg.output_dir, subdirs) if cfg.resume else (None,) * 3
    if cfg.resume and checkpoint is None:
        log(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
    if checkpoint is not None:
        for run, weights in zip(runs, checkpoint_weights, strict=True):
            set_adapter_weights(model, weights, run.name)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history, before = state["step"], state["history"], state["before"]
        tokens, train_time = state["tokens"], state["train_time"]
        log(f"resumed from {checkpoint} at step {start_step}")

    eval_time = 0.0
    if before is None:
        t = time.perf_counter()
        before = _evaluate(model, tokenizer, runs, cfg, "before")
        eval_time += time.perf_counter() - t
    if checkpoint is not None:
        set_rng_state(state["rng"])
    else:
        _seed_all(cfg.seed)  # evaluation draws from the RNG too: training starts from the same state either way

    def save_all(root: str) -> None:
        for run in runs:
            run.save(model, root)

    model.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True)
    for step in range(start_step, cfg.steps):
        t = time.perf_counter()
        # Rows grouped by adapter: batch_size of each adapter's sequences, in the order of `runs`.
        rows = [(run, run.sequences[i]) for run in runs
                for i in _batch_indices(step, cfg.batch_size, len(run.sequences), cfg.seed)]
        batch = collate([sequence for _, sequence in rows], tokenizer.pad_token_id)
        batch = {k: v.to(cfg.device) for k, v in batch.items()}
        with batch_adapters(model, [run.name for run, _ in rows]):
            out = model(**batch)
        out.loss.backward()
        if cfg.max_grad_norm:
            for run in runs:  # per adapter: each is clipped as if trained alone
                torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lrs = {g["adapter"]: g["lr"] for g in optimizer.param_groups if not g["lora_plus_b"]}
        losses = {run.name: {"loss": float(out.adapter_losses[run.name].detach()),
                             "aux_loss": float(out.adapter_aux_losses[run.name].detach()), "lr": lrs[run.name]}
                  for run in runs}
        elapsed = time.perf_counter() - t
        train_time += elapsed
        step_tokens = int(batch["attention_mask"].sum())
        tokens += step_tokens
        history.append(history_entry(step + 1, losses, nested))
        shown = {n: f"{v['loss']:.4f}" for n, v in losses.items()} if nested else \
            {"loss": f"{losses[runs[0].name]['loss']:.4f}", "aux": f"{losses[runs[0].name]['aux_loss']:.4f}"}
        bar.set_postfix({**shown, "tok_s": f"{step_tokens / elapsed:.0f}"})
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(cfg.output_dir, save_all, {
                "step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), "history": history, "before": before, "tokens": tokens,
                "train_time": train_time, "config": config_dict(cfg)}, cfg.keep_checkpoints)
    bar.close()

    save_all(cfg.output_dir)
    t = time.perf_counter()
    after = _evaluate(model, tokenizer, runs, cfg, "after")
    eval_time += time.perf_counter() - t

    per_adapter = {run.name: _adapter_summary(run, adapter_history(history, run.name, nested), before[run.name],
                                              after[run.name]) for run in runs}
    summary: dict[str, Any] = {
        "config": config_dict(cfg),
        "base_model": base,
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "steps": cfg.steps,
        "resumed_from_step": start_step if checkpoint is not None else None,
        "commit": git_commit(),
        **({"adapters": per_adapter} if nested else per_adapter[runs[0].name]),
        "time_s": {"total": time.perf_counter() - started, "train": train_time, "eval": eval_time},
        "tokens": tokens,
        "tokens_per_s": tokens / train_time if train_time else None,
        "history": history,
    }
    write_json_atomically(os.path.join(cfg.output_dir, SUMMARY_NAME), summary)
    plot_losses(history, os.path.join(cfg.output_dir, LOSS_PLOT_NAME),
                plot_title(summary, {run.name: run.config for run in runs}, nested))
    timing = (f"{cfg.steps} steps in {train_time:.0f} s ({summary['tokens_per_s']:.0f} tokens/s); "
              f"total {summary['time_s']['total']:.0f} s on {summary['device']}")
    for run in runs:
        if nested:
            log(f"adapter {run.name}:")
        log(format_accuracy_table(before[run.name], after[run.name]))
        log(loss_line(per_adapter[run.name], len(history)) + ("" if nested else f"; {timing}"))
    if nested:
        log(timing)
        log(f"adapters in {', '.join(run.directory(cfg.output_dir) for run in runs)}; {SUMMARY_NAME} and "
            f"{LOSS_PLOT_NAME} in {cfg.output_dir}")
    else:
        log(f"adapter, {SUMMARY_NAME} and {LOSS_PLOT_NAME} in {cfg.output_dir}")
    return model, tokenizer, summary


def __getattr__(name: str):
    # MixLoraTrainer lives in mixlora.hf_trainer: importing transformers.Trainer takes seconds, which `mixlora
    # --help` and the argument checks of `mixlora train` should not wait for.
    if name == "MixLoraTrainer":
        from mixlora.hf_trainer import MixLoraTrainer

        return MixLoraTrainer
    raise AttributeError(f"module 'mixlora.train' has no attribute {name!r}")
