"""The README's Python snippet (section "## Use") runs as written, on a tiny random Llama saved where it says
"path/to/llama" (no downloads)."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("tokenizers")
from test_cli import _save_tiny_llama  # noqa: E402

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def _use_snippet() -> str:
    text = open(README, encoding="utf-8").read()
    section = text[text.index("\n## Use\n"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block in the README's '## Use' section"
    return blocks[0]


def test_use_snippet_runs_as_written(tmp_path, monkeypatch):
    base = tmp_path / "path" / "to" / "llama"
    _save_tiny_llama(base)
    monkeypatch.chdir(tmp_path)  # "path/to/llama" and "adapter/" are relative to the working directory
    snippet = _use_snippet()
    namespace: dict = {}
    exec(compile(snippet, "README.md ## Use", "exec"), namespace)

    out, model, config = namespace["out"], namespace["model"], namespace["config"]
    # What the comments claim: training mode adds the aux loss to the LM loss, gradients reach the adapters only,
    # and the adapter reloads in bf16 with the published files.
    assert out.aux_loss > 0
    lm_loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), namespace["ids"][0, 1:])
    assert torch.allclose(out.loss, lm_loss + out.aux_loss, rtol=1e-5)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert config.num_experts == 8 and config.top_k == 2
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.bfloat16
