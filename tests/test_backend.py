"""Backend choice: MIXLORA_BACKEND parsing, explicit backends that cannot load, and the scoped switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mixlora_kernels import backend, selected_backends


def _import_with(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIXLORA_BACKEND": value}
    return subprocess.run([sys.executable, "-c", "import mixlora_kernels; print(mixlora_kernels.selected_backends())"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_unknown_backend_is_rejected():
    run = _import_with("fastest")
    assert run.returncode != 0
    assert "MIXLORA_BACKEND must be one of ('auto', 'cuda', 'triton', 'torch'), got 'fastest'" in run.stderr


@pytest.mark.skipif(backend.loaded(), reason="a kernel backend loads on this machine")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_explicit_backend_that_cannot_load_raises(name):
    run = _import_with(name)
    assert run.returncode != 0
    assert f"MIXLORA_BACKEND={name} cannot load" in run.stderr


def test_every_op_reports_a_backend_and_use_restores_it():
    before = selected_backends()
    assert set(before) == {"route", "route_backward", "router_logits", "sort_slots", "lora_shrink",
                           "lora_shrink_backward", "expand_act_combine", "expand_act_combine_backward",
                           "lora_expand_combine", "lora_expand_combine_backward"}
    with backend.use("torch") as used:
        assert set(used.values()) == {"torch"}
    assert selected_backends() == before
    with pytest.raises(ValueError, match="backend 'nope' is not loaded here"):
        with backend.use("nope"):
            pass
