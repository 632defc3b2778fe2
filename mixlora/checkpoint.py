"""MixLoRA adapter checkpoints (docs/algorithm.md §4): published state-dict keys and the files on disk.

Inside a model, the adapter parameters have this package's names (the prefix before `layers.` depends on the
architecture, e.g. `model.` or `model.language_model.`); experts are stacked along a leading dimension E:

    ...layers.{i}.self_attn.{P}.lora_A.weight        (r, in)
    ...layers.{i}.self_attn.{P}.lora_B.weight        (out, r)
    ...layers.{i}.self_attn.{P}.lora_magnitude_vector (out,)        DoRA only
    ...layers.{i}.mlp.moe_gate.weight                (E, H) fp32
    ...layers.{i}.mlp.experts.{P}.lora_A             (E, R, in)
    ...layers.{i}.mlp.experts.{P}.lora_B             (E, out, R)
    ...layers.{i}.mlp.experts.{P}.lora_magnitude_vector (E, out)    DoRA only

A checkpoint uses the published (MoE-PEFT / `mixlora` 0.2.3) keys, one tensor per expert:

    mixlora.layers.{i}.self_attn.{P}.lora_A.weight / .lora_B.weight / .lora_magnitude_vector
    mixlora.layers.{i}.mlp.moe_gate.weight
    mixlora.layers.{i}.mlp.{P}.experts.{e}.lora_A.weight / .lora_B.weight / .lora_magnitude_vector

The magnitude vectors are this package's extension (the published code never saved them). The legacy layout
(before Aug 2024: `mixlora.layers.{i}.gate.weight`, `mixlora.layers.{i}.experts.{e}.{P}...`, FFN names possibly
w1_proj/w2_proj/w3_proj) is read too.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping

import safetensors
import safetensors.torch
import torch

from .config import CONFIG_NAME, LEGACY_PROJECTION_NAMES, MixLoraConfig
from .fileio import AdapterFileError, write_file_atomically

__all__ = [
    "AdapterFileError",
    "CONFIG_NAME",
    "SAFETENSORS_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "from_published_state_dict",
    "read_adapter",
    "read_torch_file",
    "write_adapter",
    "to_published_state_dict",
]

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"

# Searched (not matched) so that any architecture prefix before `layers.` is accepted.
_OURS_ATTENTION = re.compile(
    r"(?:^|\.)layers\.(\d+)\.self_attn\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_OURS_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.moe_gate\.weight$")
_OURS_EXPERTS = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.experts\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)$")

_LEGACY_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.gate\.weight$")
_LEGACY_EXPERT = re.compile(
    r"^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)

_MAGNITUDE = "lora_magnitude_vector"
_HINT = "was this adapter trained for another base model or config?"
_SHOWN = 5  # how many offending keys an error message lists


def to_published_state_dict(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename this package's adapter parameters to the published checkpoint keys.

    Args:
        model_state: our adapter parameter name -> tensor (the module docstring lists the names and shapes), e.g.
            the trainable entries of `model.state_dict()`. Stacked expert tensors (E, R, in) / (E, out, R) /
            (E, out) are split into one tensor per expert.

    Returns:
        published key -> tensor: fresh contiguous copies (detached, same dtype and device), so saving or changing
        them never touches the model.

    Raises:
        ValueError: a name that is not an adapter parameter of the layout above (the first few are listed), a
            tensor with the wrong number of dimensions, or two names that map to the same published key.
    """
    published: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unmapped = []
    for name, tensor in model_state.items():
        plan = _plan(name, tuple(tensor.shape))
        if plan is None:
            unmapped.append(name)
            continue
        keys, _, stacked = plan
        for expert, key in enumerate(keys):
            _claim(source, key, name)
            value = tensor[expert] if stacked else tensor
            published[key] = value.detach().clone(memory_format=torch.contiguous_format)
    if unmapped:
        raise _unmapped_error(unmapped)
    return published


def from_published_state_dict(
    weights: Mapping[str, torch.Tensor], ours: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map checkpoint tensors (published or legacy keys) to this package's parameter names.

    Args:
        weights: published key -> tensor, as read from a checkpoint. The legacy layout is detected and converted.
        ours: our adapter parameter name -> current tensor (only names and shapes are used; e.g. the model's
            trainable parameters). Every one of them must be provided by the checkpoint.

    Returns:
        our name -> tensor with exactly our shape (experts stacked along dim 0), in the checkpoint's dtype and on
        its device; the caller copies them into the parameters (`param.copy_(t)` casts).

    Raises:
        ValueError: a checkpoint key the model expects is missing (DoRA magnitude vectors included: they are
            required when the model has them), a key the model does not expect is present, a shape differs, or a
            name in `ours` is not an adapter parameter.
    """
    weights = _convert_legacy_layout(weights)
    plans: dict[str, tuple[list[str], tuple[int, ...], bool]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    source: dict[str, str] = {}
    unmapped = []
    for name, target in ours.items():
        plan = _plan(name, tuple(target.shape))
        if plan is None:
            unmapped.append(name)
            continue
        plans[name] = plan
        keys, shape, _ = plan
        for key in keys:
            _claim(source, key, name)
            expected[key] = shape
    if unmapped:
        raise _unmapped_error(unmapped)

    missing = sorted((key for key in expected if key not in weights), key=_natural_order)
    unexpected = sorted((key for key in weights if key not in expected), key=_natural_order)
    if missing:
        message = f"adapter checkpoint is missing {len(missing)} weight(s) the model expects: {_some(missing)}"
        if any(key.endswith(_MAGNITUDE) for key in missing):
            message += (
                f"; DoRA magnitude vectors ({_MAGNITUDE}) are required when use_dora is on, and checkpoints "
                "written by the published MixLoRA / MoE-PEFT code do not contain them"
            )
        if unexpected:
            message += f"; it also has {len(unexpected)} weight(s) the model does not expect: {_some(unexpected)}"
        raise ValueError(f"{message}: {_HINT}")
    if unexpected:
        raise ValueError(
            f"adapter checkpoint has {len(unexpected)} weight(s) the model does not expect: "
            f"{_some(unexpected)}: {_HINT}"
        )
    for key, shape in expected.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"adapter weight {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"adapter weight {key} has shape {tuple(value.shape)} but the model expects {shape}: {_HINT}"
            )

    ours_state = {}
    for name, (keys, _, stacked) in plans.items():
        ours_state[name] = torch.stack([weights[key] for key in keys]) if stacked else weights[keys[0]]
    return ours_state


def write_adapter(
    directory: str | os.PathLike[str],
    config: MixLoraConfig,
    published_state: Mapping[str, torch.Tensor],
    safe_serialization: bool = True,
) -> str:
    """Write an adapter directory: `adapter_config.json` and the weights; return the weights file's path.

    Args:
        directory: created if needed.
        config: written as `adapter_config.json`.
        published_state: published key -> tensor, as returned by `to_published_state_dict`; saved on CPU,
            contiguous, in their dtype.
        safe_serialization: write `adapter_model.safetensors` (metadata {"format": "pt"}) if True, else
            `adapter_model.bin` (`torch.save`, the published format).

    Each file is replaced atomically (temporary file in the same directory, then `os.replace`): a failed save
    leaves the previous files as they were and no temporary file behind. The weights are written before the
    config. After a successful save, a weights file of the other format left by an earlier save is removed, since
    `read_adapter` prefers safetensors and would otherwise read stale weights.
    """
    directory = os.fspath(directory)
    config.validate()
    tensors = {}
    for key, value in published_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"published_state must map str keys to tensors, got {key!r}: {type(value).__name__}"
            )
        tensors[key] = value.detach().to("cpu").contiguous()
    os.makedirs(directory, exist_ok=True)

    if safe_serialization:
        name, other_name = SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

        def write(tmp_path: str) -> None:
            safetensors.torch.save_file(tensors, tmp_path, metadata={"format": "pt"})

    else:
        name, other_name = WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME

        def write(tmp_path: str) -> None:
            torch.save(tensors, tmp_path)

    weights_path = os.path.join(directory, name)
    write_file_atomically(weights_path, write)
    config.save_pretrained(directory)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, other_name))
    return weights_path


def read_adapter(path: str | os.PathLike[str]) -> tuple[MixLoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter: its config and its published state dict (on CPU, dtypes as stored).

    Args:
        path: an adapter directory (weights from `adapter_model.safetensors` if present, else `adapter_model.bin`),
            or the path of one weights file (its directory holds the config).

    Returns:
        (config, published key -> tensor). Pass the tensors to `from_published_state_dict`.

    Raises:
        FileNotFoundError: the path does not exist, or the directory lacks the config or a weights file.
        AdapterFileError: (a ValueError) a file cannot be read: truncated or corrupt weights, a config that is not
            JSON, weights that are not a dict of tensors. The message names the file and what is wrong.
        ValueError: the config is invalid.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory, weights_file = path, None
    elif os.path.isfile(path):
        directory = os.path.dirname(path) or "."
        weights_file = None if os.path.basename(path) == CONFIG_NAME else path
    else:
        raise FileNotFoundError(f"MixLoRA adapter path {path!r} does not exist")
    if weights_file is None:
        candidates = [os.path.join(directory, name) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)]
        weights_file = next((file for file in candidates if os.path.isfile(file)), None)

    missing = [] if os.path.isfile(os.path.join(directory, CONFIG_NAME)) else [repr(CONFIG_NAME)]
    if weights_file is None:
        missing.append(f"{SAFETENSORS_WEIGHTS_NAME!r} or {WEIGHTS_NAME!r}")
    if missing:
        raise FileNotFoundError(
            f"{directory!r} is not a complete MixLoRA adapter directory: missing {' and '.join(missing)}"
        )

    config = MixLoraConfig.from_pretrained(directory)
    if weights_file.endswith(".safetensors"):
        try:
            weights = safetensors.torch.load_file(weights_file, device="cpu")
        except (safetensors.SafetensorError, OSError) as e:
            raise AdapterFileError(weights_file, f"is truncated or not a safetensors file ({_first_line(e)})") from e
    else:
        weights = read_torch_file(weights_file, weights_only=True)
    if not isinstance(weights, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in weights.items()
    ):
        raise AdapterFileError(weights_file, "does not hold a dict of str -> tensor")
    # Published .bin files may hold nn.Parameters; hand back plain tensors.
    return config, {key: value.detach() for key, value in weights.items()}


def read_torch_file(path: str | os.PathLike[str], weights_only: bool = True):
    """`torch.load(path)` onto the CPU; a file that cannot be read raises `AdapterFileError` saying why (truncated,
    not a PyTorch file, objects a weights-only load refuses) instead of the error of whichever layer noticed
    (PytorchStreamReader, OSError, EOFError, UnpicklingError)."""
    path = os.fspath(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # unpickling a corrupt file fails with almost any type (IndexError, KeyError, ...)
        complete = zipfile.is_zipfile(path)  # torch.save writes a zip archive whose directory is at the end
        if isinstance(e, pickle.UnpicklingError) and weights_only and complete:
            # torch's message is a page of advice; its "WeightsUnpickler error: ..." line names the object.
            reason = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line),
                          _first_line(e))
            problem = f"holds objects other than tensors, which a weights-only load refuses ({reason})"
        elif os.path.getsize(path) == 0:
            problem = "is empty"
        elif not complete:
            problem = f"is truncated or not a PyTorch file ({os.path.getsize(path)} bytes, no zip directory at its end)"
        else:
            problem = f"is corrupt ({type(e).__name__}: {_first_line(e)})"
        raise AdapterFileError(path, problem) from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _plan(name: str, shape: tuple[int, ...]) -> tuple[list[str], tuple[int, ...], bool] | None:
    """Published keys of one of our parameters: (keys in expert order, shape of each, stacked?), or None."""
    if match := _OURS_ATTENTION.search(name):
        layer, proj, part = match.groups()
        _check_ndim(name, shape, 1 if part == _MAGNITUDE else 2)
        return [f"mixlora.layers.{layer}.self_attn.{proj}.{part}"], shape, False
    if match := _OURS_ROUTER.search(name):
        _check_ndim(name, shape, 2)
        return [f"mixlora.layers.{match[1]}.mlp.moe_gate.weight"], shape, False
    if match := _OURS_EXPERTS.search(name):
        layer, proj, part = match.groups()
        _check_ndim(name, shape, 2 if part == _MAGNITUDE else 3)
        suffix = part if part == _MAGNITUDE else f"{part}.weight"
        keys = [f"mixlora.layers.{layer}.mlp.{proj}.experts.{expert}.{suffix}" for expert in range(shape[0])]
        return keys, shape[1:], True
    return None


def _check_ndim(name: str, shape: tuple[int, ...], ndim: int) -> None:
    if len(shape) != ndim:
        raise ValueError(f"adapter parameter {name} has shape {shape}; expected {ndim} dimension(s)")


def _claim(source: dict[str, str], key: str, name: str) -> None:
    if key in source:
        raise ValueError(f"adapter parameters {source[key]} and {name} both map to the checkpoint key {key}")
    source[key] = name


def _convert_legacy_layout(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename legacy router and expert keys to the current layout; other keys are kept as they are."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        new_key = key
        if match := _LEGACY_ROUTER.match(key):
            new_key = f"mixlora.layers.{match[1]}.mlp.moe_gate.weight"
        elif match := _LEGACY_EXPERT.match(key):
            layer, expert, proj, part = match.groups()
            proj = LEGACY_PROJECTION_NAMES.get(proj, proj)
            new_key = f"mixlora.layers.{layer}.mlp.{proj}.experts.{expert}.{part}"
        if new_key in converted:
            raise ValueError(f"adapter checkpoint holds two tensors for {new_key} (under a legacy and a current name)")
        converted[new_key] = value
    return converted


def _natural_order(key: str) -> list[tuple[int, int, str]]:
    """Sort key that puts layer 2 before layer 10 (and expert 2 before expert 10)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split(".")]


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown if len(keys) <= _SHOWN else f"{shown}, ... ({len(keys) - _SHOWN} more)"


def _unmapped_error(names: list[str]) -> ValueError:
    return ValueError(
        f"cannot map {len(names)} parameter name(s) to MixLoRA checkpoint keys: {_some(names)}; expected names "
        "ending in layers.{i}.self_attn.{P}.lora_A.weight / lora_B.weight / lora_magnitude_vector, "
        "layers.{i}.mlp.moe_gate.weight, or layers.{i}.mlp.experts.{P}.lora_A / lora_B / lora_magnitude_vector"
    )
