"""Shared fixtures: tiny random Hugging Face models of every supported architecture (no downloads)."""

from __future__ import annotations

import os

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The switch must be set before anything
# imports triton (torch may), so it is decided from the device nodes rather than torch.cuda.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402


def _fix_old_triton_interpreter() -> None:
    """Triton < 3.7's interpreter turns a runtime int kernel argument into a 1-element array whose `__index__`
    fails, so `for e in range(E)` raises "only 0-dimensional arrays can be converted" (interpreter only: compiled
    kernels are unaffected; triton 3.8 squeezes the array). `.ci/gpu_stack` runs the Triton tests under triton
    3.6, the lent GPU's version: give its interpreter the later `__index__`."""
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_old_triton_interpreter()

# model_type -> (config class, model class, config overrides). Sizes are tiny and deliberately odd (I = 45).
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=45, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def tiny_model(arch: str, dtype=torch.float32, seed: int = 0):
    config_cls, model_cls, overrides = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config).to(dtype).eval()


def randomize_adapters(model, seed: int = 1, std: float = 0.3) -> None:
    """Fill every parameter of every adapter (B included) with fresh random values so the adapters matter; DoRA magnitudes
    are perturbed multiplicatively around their initial row norms."""
    from mixlora import adapter_state_dict

    gen = torch.Generator().manual_seed(seed)
    params = {(adapter, n): p for adapter in model.mixlora_configs for n, p in adapter_state_dict(model, adapter).items()}
    with torch.no_grad():
        for (_, name), p in params.items():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
            p.copy_(p * (1 + std * noise) if name.endswith("lora_magnitude_vector") else std * noise)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request):
    return request.param
