"""MixLoRA adapter configuration: the dataclass behind `adapter_config.json` (docs/algorithm.md §1, §4)."""

from __future__ import annotations

import difflib
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from mixlora.fileio import AdapterFileError, write_json_atomically

# The file name of the configuration inside an adapter directory. The weight file names live in
# `mixlora.checkpoint`, which re-exports this one; it is defined here so that `checkpoint` can depend on
# `config` and not the other way round.
CONFIG_NAME = "adapter_config.json"

TaskType = Literal["CAUSAL_LM", "QUESTION_ANS"]
LoraInit = Literal["original", "gaussian"]
RoutingStrategy = Literal["mixlora", "mixlora-dynamic", "mixlora-switch"]

# Per routing strategy, the values of the fields that default to None (MoE-PEFT's defaults for a key absent
# from adapter_config.json; MoE-PEFT has no z-loss outside "mixlora-switch": 0 here).
STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "mixlora": {"router_z_loss_coef": 0.0, "router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-dynamic": {"router_z_loss_coef": 0.0, "router_init_range": 0.02, "jitter_noise": 0.0},
    "mixlora-switch": {"router_z_loss_coef": 0.001, "router_init_range": 1.0, "jitter_noise": 0.01},
}
# Routing strategy name written by MixLoRA checkpoints from before Aug 2024 (the same top-k router).
_LEGACY_ROUTING_STRATEGY = "mixtral"
# FFN projection names of those legacy checkpoints (LLaMA-type models only).
LEGACY_PROJECTION_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}

_EXPERT_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "lora_init")
# The published code writes its expert block as a copy of the LoRA export minus `peft_type` and `target_modules`,
# so these keys appear in published `expert_lora` blocks without any meaning for the experts. `bias` must still
# be "none"; the other two repeat top-level values and are dropped.
_PUBLISHED_EXPERT_LORA_EXTRAS = ("bias", "task_type", "base_model_name_or_path")


def close_matches(name: str, known: list[str] | tuple[str, ...]) -> list[str]:
    """The (at most 3) names of `known` closest to a mistyped `name`, best first (difflib, ratio >= 0.6)."""
    return difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """"; did you mean 'x' or 'y'?" for the names of `known` closest to `name`, or "" when none is close."""
    close = close_matches(name, known)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters of one group of adapters (the attention LoRAs, or every expert LoRA).

    Args:
        r: LoRA rank (R for experts).
        lora_alpha: LoRA alpha.
        lora_dropout: Dropout probability on the LoRA input (training only).
        use_dora: Whether the adapters are DoRA (trainable magnitude vector).
        use_rslora: Whether the scaling is rank-stabilised (`lora_alpha / sqrt(r)`).
        lora_init: "original" (A kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r), B zero).
    """

    r: int
    lora_alpha: float
    lora_dropout: float
    use_dora: bool
    use_rslora: bool
    lora_init: LoraInit

    @property
    def scaling(self) -> float:
        """The LoRA scale s: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class MixLoraConfig:
    """Configuration of a MixLoRA adapter, stored as `adapter_config.json` (MoE-PEFT / `mixlora` 0.2.3 compatible).

    Field names are the published JSON names. Validation runs on construction (and again before saving) and raises
    `ValueError` naming the field and what is allowed.

    Args:
        base_model_name_or_path: The base model the adapter was trained for (informational).
        task_type: "CAUSAL_LM" or "QUESTION_ANS".
        peft_type: Always "MIXLORA".
        bias: Always "none" (no bias adapters are supported).
        r: LoRA rank of the attention adapters, and of the experts unless `expert_lora` overrides it.
        lora_alpha: LoRA alpha (scale s = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA).
        lora_dropout: Dropout probability on LoRA inputs, in [0, 1); applied in training only.
        target_modules: Module names that get adapters: attention projections get plain LoRA, FFN projections get
            one LoRA per expert. A dict name -> bool (published training configs) is accepted and turned into the
            list of names whose value is True.
        use_dora: Whether adapters are DoRA.
        use_rslora: Whether the scale is rank-stabilised (alpha / sqrt(r)).
        lora_init: Initialisation of A: "original" (kaiming-uniform) or "gaussian" (N(0, 1/r)); B starts at zero.
        expert_lora: Overrides for the expert LoRAs only; keys among r, lora_alpha, lora_dropout, use_dora,
            use_rslora, lora_init. Attention LoRAs keep the top-level values.
        routing_strategy: "mixlora" (top-k: softmax, the K most probable experts, renormalised),
            "mixlora-dynamic" (top-p: the most probable experts until their cumulative probability exceeds `top_p`)
            or "mixlora-switch" (top-1 with a per-sequence expert capacity); docs/algorithm.md §1.
        num_experts: Number of experts E per MoE layer.
        top_k: "mixlora" only: experts per token K, in [1, num_experts] (an int >= 1, unused, for the others).
        act_fn: FFN activation name (a key of `transformers.activations.ACT2FN`); None uses the model's own.
        router_aux_loss_coef: Coefficient of the load-balancing auxiliary loss, >= 0.
        router_z_loss_coef: Coefficient of the router z-loss, >= 0 (0 disables it). Default: 0.001 for
            "mixlora-switch", 0 otherwise.
        router_init_range: Standard deviation of the router's normal initialisation, > 0. Default: 1.0 for
            "mixlora-switch", 0.02 otherwise.
        jitter_noise: Multiplicative input jitter U(1 - eps, 1 + eps) in training, in [0, 1): on the router and
            expert inputs, or on the router input only for "mixlora-switch". Default: 0.01 for "mixlora-switch",
            0 otherwise.
        router_loss: Whether the auxiliary router loss is added to the training loss.
        top_p: "mixlora-dynamic" only: probability mass of the selected experts, in (0, 1].
        temperature: "mixlora-dynamic" only, >= 0: when > 0 the router probabilities (not the logits) are divided
            by it before the selection, as MoE-PEFT does.
        expert_capacity: "mixlora-switch" only: tokens each expert takes per sequence, >= 1; later tokens routed
            to a full expert skip the FFN (their output is the router probability times their input).
        ffn_dropout: "mixlora-switch" only: dropout on the layer's output in training, in [0, 1).
        sparse_step: "mixlora-switch" only: read and written back (MoE-PEFT stores it and never uses it); None or
            an int >= 1.
        loraplus_lr_ratio: LoRA+ learning-rate ratio of the B matrices to the A matrices, > 0, or None (plain LoRA
            optimisation); written to the JSON only when set.

    The three strategy-dependent fields (`router_z_loss_coef`, `router_init_range`, `jitter_noise`) default to
    None, which `__post_init__` replaces with the value for `routing_strategy` (the defaults MoE-PEFT applies to a
    key absent from the JSON), so `MixLoraConfig(routing_strategy="mixlora-switch")` and a published switch config
    without those keys get the same values. They are resolved once, at construction: assigning another
    `routing_strategy` later keeps them. `to_dict` writes the resolved values.
    """

    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The base model the adapter was trained for."}
    )
    task_type: TaskType = field(default="CAUSAL_LM", metadata={"help": "'CAUSAL_LM' or 'QUESTION_ANS'."})
    peft_type: str = field(default="MIXLORA", metadata={"help": "Always 'MIXLORA'."})
    bias: str = field(default="none", metadata={"help": "Always 'none': bias adapters are not supported."})
    r: int = field(default=8, metadata={"help": "LoRA rank (attention, and experts unless expert_lora overrides)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha; scale = lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA input dropout in training, in [0, 1)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names to adapt: attention projections (LoRA) and FFN projections (experts)."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Use DoRA adapters."})
    use_rslora: bool = field(default=False, metadata={"help": "Use rank-stabilised scaling lora_alpha / sqrt(r)."})
    lora_init: LoraInit = field(default="original", metadata={"help": "Init of A: 'original' or 'gaussian'."})
    expert_lora: dict[str, Any] | None = field(
        default=None, metadata={"help": f"Expert-only overrides of {', '.join(_EXPERT_LORA_KEYS)}.",
                                "omit_none": True}
    )
    routing_strategy: RoutingStrategy = field(
        default="mixlora", metadata={"help": "Router: 'mixlora' (top-k), 'mixlora-dynamic' (top-p) or "
                                             "'mixlora-switch' (top-1 with expert capacity)."}
    )
    num_experts: int = field(default=8, metadata={"help": "Number of experts E per MoE layer."})
    top_k: int = field(default=2, metadata={"help": "mixlora: experts per token K, in [1, num_experts]."})
    act_fn: str | None = field(
        default=None, metadata={"help": "FFN activation (ACT2FN key); None uses the model's own."}
    )
    router_aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing aux loss coefficient."})
    router_z_loss_coef: float | None = field(
        default=None, metadata={"help": "Router z-loss coefficient, 0 disables (default: 0.001 for "
                                        "mixlora-switch, else 0)."}
    )
    router_init_range: float | None = field(
        default=None, metadata={"help": "Std of the router weight init (default: 1.0 for mixlora-switch, else 0.02)."}
    )
    jitter_noise: float | None = field(
        default=None, metadata={"help": "Router input jitter in training, in [0, 1) (default: 0.01 for "
                                        "mixlora-switch, else 0)."}
    )
    router_loss: bool = field(default=True, metadata={"help": "Add the aux loss to the training loss."})
    top_p: float = field(default=0.8, metadata={"help": "mixlora-dynamic: probability mass kept, in (0, 1]."})
    temperature: float = field(
        default=0.0, metadata={"help": "mixlora-dynamic: divides the router probabilities when > 0."}
    )
    expert_capacity: int = field(
        default=32, metadata={"help": "mixlora-switch: tokens per expert and sequence, >= 1."}
    )
    ffn_dropout: float = field(default=0.0, metadata={"help": "mixlora-switch: output dropout in training."})
    sparse_step: int | None = field(
        default=None, metadata={"help": "mixlora-switch: stored for MoE-PEFT, unused (None or an int >= 1)."}
    )
    loraplus_lr_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+ learning-rate ratio lr_B / lr_A, > 0 (None: plain LoRA).",
                                "omit_none": True}
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, Mapping):
            self.target_modules = _target_modules_from_mapping(self.target_modules)
        elif isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.expert_lora, Mapping):
            # A copy, so that later changes to the caller's dict do not bypass validation.
            self.expert_lora = dict(self.expert_lora)
        defaults = STRATEGY_DEFAULTS.get(self.routing_strategy, STRATEGY_DEFAULTS["mixlora"])
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Check every field; raise `ValueError` naming the first invalid one and what is allowed."""
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            _fail_type("base_model_name_or_path", "a str or None", self.base_model_name_or_path)
        _check_choice("task_type", self.task_type, get_args(TaskType))
        _check_choice("peft_type", self.peft_type, ("MIXLORA",))
        _check_choice("bias", self.bias, ("none",))
        for key in _EXPERT_LORA_KEYS:
            _check_lora_setting(key, key, getattr(self, key))
        _check_target_modules(self.target_modules)
        _check_expert_lora(self.expert_lora)
        _check_routing_strategy(self.routing_strategy)
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        if self.routing_strategy == "mixlora" and self.top_k > self.num_experts:
            raise ValueError(
                f"MixLoraConfig.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.act_fn is not None:
            if not isinstance(self.act_fn, str):
                _fail_type("act_fn", "a str or None", self.act_fn)
            # Imported here: transformers (with torch) takes seconds to import, and the `mixlora` command reads
            # this module's fields for its --help.
            from transformers.activations import ACT2FN

            _check_choice("act_fn", self.act_fn, tuple(sorted(ACT2FN)))
        _check_real("router_aux_loss_coef", self.router_aux_loss_coef, ">= 0", lambda x: x >= 0)
        _check_real("router_z_loss_coef", self.router_z_loss_coef, ">= 0", lambda x: x >= 0)
        _check_real("router_init_range", self.router_init_range, "> 0", lambda x: x > 0)
        _check_real("jitter_noise", self.jitter_noise, "in [0, 1)", lambda x: 0 <= x < 1)
        _check_bool("router_loss", self.router_loss)
        _check_real("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1)
        _check_real("temperature", self.temperature, ">= 0", lambda x: x >= 0)
        _check_int("expert_capacity", self.expert_capacity, minimum=1)
        _check_real("ffn_dropout", self.ffn_dropout, "in [0, 1)", lambda x: 0 <= x < 1)
        if self.sparse_step is not None:
            _check_int("sparse_step", self.sparse_step, minimum=1)
        if self.loraplus_lr_ratio is not None:
            _check_real("loraplus_lr_ratio", self.loraplus_lr_ratio, "> 0 (or None)", lambda x: x > 0)

    def expert_config(self) -> LoraSettings:
        """LoRA settings of the experts: the top-level values overridden by `expert_lora`."""
        values = {key: getattr(self, key) for key in _EXPERT_LORA_KEYS}
        values.update(self.expert_lora or {})
        return LoraSettings(**values)

    def attention_config(self) -> LoraSettings:
        """LoRA settings of the attention adapters: the top-level values (`expert_lora` does not apply)."""
        return LoraSettings(**{key: getattr(self, key) for key in _EXPERT_LORA_KEYS})

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MixLoraConfig:
        """Build a config from the published JSON dict.

        Accepts what the published implementations write: `target_modules` as a list or a dict name -> bool, the
        legacy routing strategy "mixtral" (read as "mixlora", with the legacy FFN names w1_proj/w2_proj/w3_proj
        in `target_modules` renamed to gate_proj/down_proj/up_proj), and the extra keys bias (= "none"),
        task_type and base_model_name_or_path inside `expert_lora`. Any other key that is not a field raises
        `ValueError` naming it: nothing is dropped silently.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"MixLoraConfig.from_dict expects a dict, got {type(config).__name__}")
        values = dict(config)
        target_modules = values.get("target_modules")
        if isinstance(target_modules, Mapping):
            values["target_modules"] = target_modules = _target_modules_from_mapping(target_modules)
        if values.get("routing_strategy") == _LEGACY_ROUTING_STRATEGY:
            values["routing_strategy"] = "mixlora"
            if isinstance(target_modules, (list, tuple)) and all(isinstance(n, str) for n in target_modules):
                renamed = [LEGACY_PROJECTION_NAMES.get(name, name) for name in target_modules]
                values["target_modules"] = list(dict.fromkeys(renamed))
        # Checked before unknown keys: a config of an unknown strategy may carry that strategy's own keys, and the
        # strategy is the useful message for it.
        _check_routing_strategy(values.get("routing_strategy", "mixlora"))
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = [f"{key!r}: did you mean {' or '.join(map(repr, close))}?" for key in unknown
                     if (close := close_matches(key, known))]
            raise ValueError(
                f"MixLoraConfig.from_dict got unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(known)}" + (f" ({'; '.join(hints)})" if hints else "")
            )
        expert_lora = values.get("expert_lora")
        if isinstance(expert_lora, Mapping):
            expert_lora = dict(expert_lora)
            if "bias" in expert_lora:
                _check_choice("expert_lora['bias']", expert_lora["bias"], ("none",))
            for key in _PUBLISHED_EXPERT_LORA_EXTRAS:
                expert_lora.pop(key, None)
            values["expert_lora"] = expert_lora
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The published JSON dict: one key per field, in field order (`target_modules` as a list).

        Generated from the dataclass fields, so a new field is written without code here. Float fields (`float` or
        `float | None` annotations) are written as JSON floats and an integral `lora_alpha` as an int, because the
        published loaders assert those Python types (MoE-PEFT: `isinstance(lora_alpha, int)`, `isinstance(...,
        float)` for dropout, coefficients, top_p, temperature). Fields marked `omit_none` (`expert_lora`, which the
        published loaders read as a dict whenever the key is present, and `loraplus_lr_ratio`) are left out when
        None. The strategy-dependent defaults are written as resolved.
        """
        self.validate()
        floats = _float_fields()
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            if f.name == "target_modules":
                value = list(value)
            elif f.name == "expert_lora":
                value = _lora_settings_to_json(value)
            elif f.name == "lora_alpha":
                value = _lora_settings_to_json({"lora_alpha": value})["lora_alpha"]
            elif f.name in floats and value is not None:
                value = float(value)
            out[f.name] = value
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> MixLoraConfig:
        """Read `adapter_config.json` from an adapter directory (or from the path of that file itself)."""
        path = os.fspath(path)
        file = path if os.path.isfile(path) else os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no MixLoRA config in {path!r}: expected the file {CONFIG_NAME!r} there")
        try:
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
        except UnicodeDecodeError:
            # E.g. the weights file given instead of the adapter directory.
            raise AdapterFileError(file, f"is not a text file, so not a MixLoRA config ({CONFIG_NAME}); pass the "
                                         "adapter directory that holds it") from None
        except json.JSONDecodeError as e:
            raise AdapterFileError(file, f"is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise AdapterFileError(file, f"holds a JSON {type(config).__name__}, not the mapping of a MixLoRA config")
        try:
            return cls.from_dict(config)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e

    def save_pretrained(self, directory: str | os.PathLike[str]) -> str:
        """Write `adapter_config.json` into `directory` (created if needed) atomically; return the file path."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, CONFIG_NAME)
        write_json_atomically(file, self.to_dict())
        return file


@functools.cache
def _float_fields() -> frozenset[str]:
    """Names of the MixLoraConfig fields annotated `float` or `float | None` (written as JSON floats)."""
    hints = get_type_hints(MixLoraConfig)
    return frozenset(name for name, hint in hints.items() if hint is float or float in get_args(hint))


def _target_modules_from_mapping(target_modules: Mapping[Any, Any]) -> list[Any]:
    for name, enabled in target_modules.items():
        if not isinstance(enabled, bool):
            raise ValueError(
                f"MixLoraConfig.target_modules given as a dict must map names to bools, got {name!r}: {enabled!r}"
            )
    return [name for name, enabled in target_modules.items() if enabled]


def _lora_settings_to_json(values: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(values)
    if "lora_alpha" in out:
        alpha = out["lora_alpha"]
        out["lora_alpha"] = int(alpha) if float(alpha).is_integer() else float(alpha)
    if "lora_dropout" in out:
        out["lora_dropout"] = float(out["lora_dropout"])
    return out


def _fail_type(name: str, expected: str, value: Any) -> None:
    raise ValueError(f"MixLoraConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MixLoraConfig.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail_type(name, "a bool", value)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail_type(name, "an int", value)
    if value < minimum:
        raise ValueError(f"MixLoraConfig.{name} must be an int >= {minimum}, got {value}")


def _check_real(name: str, value: Any, requirement: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail_type(name, "a number", value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"MixLoraConfig.{name} must be {requirement}, got {value!r}")


def _check_lora_setting(name: str, key: str, value: Any) -> None:
    """Validate one of the LoRA settings that `expert_lora` may override; `name` is used in the message."""
    if key == "r":
        _check_int(name, value, minimum=1)
    elif key == "lora_alpha":
        _check_real(name, value, "> 0", lambda x: x > 0)
    elif key == "lora_dropout":
        _check_real(name, value, "in [0, 1)", lambda x: 0 <= x < 1)
    elif key in ("use_dora", "use_rslora"):
        _check_bool(name, value)
    elif key == "lora_init":
        _check_choice(name, value, get_args(LoraInit))
    else:
        raise ValueError(
            f"MixLoraConfig.expert_lora has unknown key {key!r}; allowed keys: {', '.join(_EXPERT_LORA_KEYS)}"
        )


def _check_target_modules(target_modules: Any) -> None:
    if not isinstance(target_modules, list) or not target_modules:
        raise ValueError(
            f"MixLoraConfig.target_modules must be a non-empty list of module names, got {target_modules!r}"
        )
    for name in target_modules:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(
                f"MixLoraConfig.target_modules must hold module names (non-empty str without '.'), got {name!r}"
            )
    duplicates = sorted({name for name in target_modules if target_modules.count(name) > 1})
    if duplicates:
        raise ValueError(f"MixLoraConfig.target_modules lists {', '.join(map(repr, duplicates))} more than once")


def _check_expert_lora(expert_lora: Any) -> None:
    if expert_lora is None:
        return
    if not isinstance(expert_lora, dict):
        _fail_type("expert_lora", "a dict or None", expert_lora)
    for key, value in expert_lora.items():
        _check_lora_setting(f"expert_lora[{key!r}]", key, value)


def _check_routing_strategy(value: Any) -> None:
    known = get_args(RoutingStrategy)
    if value not in known:
        hint = ""
        if value == _LEGACY_ROUTING_STRATEGY:
            hint = " ('mixtral' is the legacy name of 'mixlora'; MixLoraConfig.from_dict converts it)"
        raise ValueError(
            f"MixLoraConfig.routing_strategy must be one of {', '.join(map(repr, known))}, got {value!r}{hint}"
        )
