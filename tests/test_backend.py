"""Backend choice: MIXLORA_BACKEND parsing, what each op gets on a (faked) CUDA machine with and without the compiled
extension, the evidence order, the scoped switch, and the first-use self-check with deliberately wrong kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from mixlora_kernels import backend, ops, selected_backends
from mixlora_kernels.selftest import cast, check_against_reference, sample_inputs, tolerance_violation

OPS = {"route", "route_backward", "router_logits", "router_logits_backward", "sort_slots", "lora_shrink",
       "lora_shrink_backward", "expand_act_combine", "expand_act_combine_backward", "lora_expand_combine",
       "lora_expand_combine_backward"}

# In a fresh process: torch.cuda.is_available() faked True before the import, optionally a fake compiled extension
# (a `mixlora_kernels._C` module and a `mixlora_cuda` op library with sort_slots and route only), then print what
# every op gets on CUDA, the loaded backends, the load errors and the evidence order.
_PROBE = textwrap.dedent("""
    import json, sys, types
    import torch
    torch.cuda.is_available = lambda: True
    sys.modules["mixlora_kernels._C"] = None  # as if not built, even where it is (CI builds it)
    if {fake_extension}:
        sys.modules["mixlora_kernels._C"] = types.ModuleType("mixlora_kernels._C")
        lib = torch.library.Library("mixlora_cuda", "DEF")
        lib.define("sort_slots(Tensor experts, int num_experts) -> (Tensor, Tensor)")
        lib.define("route(Tensor logits, int top_k) -> (Tensor, Tensor)")
    import mixlora_kernels
    from mixlora_kernels import backend
    print(json.dumps({{"selected": backend.selected("cuda"), "loaded": backend.loaded(),
                       "errors": backend.load_errors(), "order": backend.evidence_order(["cuda", "triton"])}}))
""")


def _probe(requested: str, fake_extension: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIXLORA_BACKEND": requested}
    return subprocess.run([sys.executable, "-c", _PROBE.format(fake_extension=fake_extension)], env=env,
                          capture_output=True, text=True, timeout=300)


def _selection(requested: str, fake_extension: bool) -> dict:
    run = _probe(requested, fake_extension)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_unknown_backend_is_rejected():
    run = subprocess.run([sys.executable, "-c", "import mixlora_kernels"], capture_output=True, text=True,
                         env={**os.environ, "MIXLORA_BACKEND": "fastest"}, timeout=120)
    assert run.returncode != 0
    assert "MIXLORA_BACKEND must be one of ('auto', 'cuda', 'triton', 'torch'), got 'fastest'" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the backends may load")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_explicit_gpu_backend_without_gpu_raises(name):
    run = subprocess.run([sys.executable, "-c", "import mixlora_kernels"], capture_output=True, text=True,
                         env={**os.environ, "MIXLORA_BACKEND": name}, timeout=120)
    assert run.returncode != 0
    assert f"MIXLORA_BACKEND={name} cannot load" in run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="fakes CUDA availability on a machine without a GPU")
@pytest.mark.parametrize("fake_extension", [False, True], ids=["no-extension", "extension"])
def test_selection_on_a_cuda_machine(fake_extension):
    """Op by op, on a faked CUDA machine: Triton has every op; the fake extension has sort_slots and route. auto
    follows the evidence order, an explicit backend serves its ops and leaves the rest to the reference, torch serves
    everything with the reference."""
    triton_ops = set(OPS)
    cuda_ops = {"sort_slots", "route"} if fake_extension else set()

    auto = _selection("auto", fake_extension)
    order = auto["order"] if fake_extension else ["triton"]
    assert auto["loaded"] == [b for b in order if b in ("cuda", "triton")] + (["cpu"] if "cpu" in auto["loaded"]
                                                                               else [])
    for op in OPS:
        have = [b for b in order if op in {"cuda": cuda_ops, "triton": triton_ops}[b]]
        assert auto["selected"][op] == (have[0] if have else "torch"), op
    if not fake_extension:
        assert auto["errors"]["cuda"].startswith("ModuleNotFoundError")  # kept, and warned about (a GPU is "here")

    triton = _selection("triton", fake_extension)
    assert triton["selected"] == {op: "triton" if op in triton_ops else "torch" for op in OPS}

    if fake_extension:
        cuda = _selection("cuda", fake_extension)
        assert cuda["selected"] == {op: "cuda" if op in cuda_ops else "torch" for op in OPS}
    else:
        run = _probe("cuda", fake_extension)
        assert run.returncode != 0 and "MIXLORA_BACKEND=cuda cannot load" in run.stderr

    assert set(_selection("torch", fake_extension)["selected"].values()) == {"torch"}


def test_evidence_order_prefers_measurement_then_prediction(tmp_path, monkeypatch):
    measured, predicted = tmp_path / "measured.json", tmp_path / "predicted.json"
    monkeypatch.setattr(backend, "MEASURED_COST", measured)
    monkeypatch.setattr(backend, "PREDICTED_COST", predicted)
    assert backend.evidence_order(["cuda", "triton"]) == ["cuda", "triton"]  # no evidence: the default order
    predicted.write_text(json.dumps({"cuda": {"4096": 33.0, "16384": 90.0}, "triton": {"4096": 14.0, "16384": 50.0}}))
    assert backend.evidence_order(["cuda", "triton"]) == ["triton", "cuda"]
    assert backend.evidence_order(["cuda"]) == ["cuda"]
    measured.write_text(json.dumps({"cuda": {"4096": 4.0}, "triton": {"4096": 4.5}}))
    assert backend.evidence_order(["cuda", "triton"]) == ["cuda", "triton"]  # a measurement beats a prediction
    measured.write_text(json.dumps({"triton": {"4096": 4.5}}))
    assert backend.evidence_order(["cuda", "triton"]) == ["triton", "cuda"]  # unmeasured backends come after


def test_every_op_reports_a_backend_and_use_restores_it():
    before = selected_backends()
    assert set(before) == OPS
    with backend.use("torch") as used:
        assert set(used.values()) == {"torch"}
    assert selected_backends() == before
    with pytest.raises(ValueError, match="backend 'nope' is not loaded here"):
        with backend.use("nope"):
            pass


# --- the first-use self-check -------------------------------------------------------------------------------------


@pytest.fixture
def serve(monkeypatch):
    """serve(name, chain): CPU tensors of op `name` go to `chain` [(backend, fn), ...] for this test only."""
    saved_chains, saved_chosen, saved_fallbacks = dict(backend._CHAINS), dict(backend._CHOSEN), list(backend._FALLBACKS)
    monkeypatch.setenv("MIXLORA_SELFTEST", "1")
    yield lambda name, chain: backend._serve(name, "cpu", chain)
    backend._CHAINS.clear()
    backend._CHAINS.update(saved_chains)
    backend._CHOSEN.clear()
    backend._CHOSEN.update(saved_chosen)
    backend._FALLBACKS[:] = saved_fallbacks


def _shrink_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x, A = torch.randn(9, 16, generator=g).to(dtype), torch.randn(4, 6, 16, generator=g).to(dtype)
    weights, experts = ops.route(torch.randn(9, 4, generator=g), 2)
    order, offsets = ops.sort_slots(experts, 4)
    return x, A, experts, order, offsets, 0.0, 0


def test_a_wrong_kernel_is_caught_on_first_use_and_replaced(serve):
    calls = []

    def off_by_one_percent(*args):
        calls.append(1)
        return backend._REFERENCES["lora_shrink"](*args) * 1.01

    serve("lora_shrink", [("bad", off_by_one_percent)])
    inputs = _shrink_inputs()
    with pytest.warns(backend.BackendWarning, match=r"mixlora::lora_shrink: backend 'bad' failed its self-check on "
                                                    r"cpu torch.float32 and is not used for it: output 0: "):
        z = ops.lora_shrink(*inputs)
    assert calls == [1]  # the self-check ran it once; the call itself went to the reference
    torch.testing.assert_close(z, backend._REFERENCES["lora_shrink"](*inputs), rtol=0, atol=0)
    assert backend.fallbacks()[-1]["op"] == "lora_shrink" and backend.fallbacks()[-1]["backend"] == "bad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.lora_shrink(*inputs)  # decided once per (op, device, dtype): no second check, no second warning
    assert calls == [1]


def test_a_raising_kernel_falls_back_to_the_next_one(serve):
    good_calls = []

    def raises(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def good(*args):
        good_calls.append(1)
        return backend._REFERENCES["lora_shrink"](*args)

    serve("lora_shrink", [("broken", raises), ("good", good)])
    with pytest.warns(backend.BackendWarning, match="backend 'broken' failed its self-check .* RuntimeError: CUDA "
                                                    "error: an illegal memory access"):
        ops.lora_shrink(*_shrink_inputs())
    assert len(good_calls) == 2  # its self-check, then the call


def test_selftest_off_serves_the_kernel_unchecked(serve, monkeypatch):
    monkeypatch.setenv("MIXLORA_SELFTEST", "0")
    serve("lora_shrink", [("bad", lambda *a: backend._REFERENCES["lora_shrink"](*a) * 2)])
    inputs = _shrink_inputs()
    assert torch.equal(ops.lora_shrink(*inputs), 2 * backend._REFERENCES["lora_shrink"](*inputs))


def test_fp64_always_gets_the_reference(serve):
    serve("lora_shrink", [("bad", lambda *a: pytest.fail("an fp64 call reached a kernel"))])
    inputs = _shrink_inputs(torch.float64)
    assert torch.equal(ops.lora_shrink(*inputs), backend._REFERENCES["lora_shrink"](*inputs))


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_passes_the_reference_and_fails_a_perturbed_one(name, dtype):
    """The tolerance rule is neither too strict (the reference itself passes, in every dtype) nor too loose (a 5%
    error in any one output, or wrong integer ids, fails)."""
    ref = backend._REFERENCES[name]
    assert check_against_reference(name, ref, ref, torch.device("cpu"), dtype) is None
    out = ref(*cast(name, sample_inputs(name, torch.Generator().manual_seed(0)), "cpu", dtype))
    n_out = 1 if isinstance(out, torch.Tensor) else len(out)
    for i in range(n_out):
        def perturbed(*args, i=i):
            out = ref(*args)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            if outs[i].is_floating_point():
                outs[i] = outs[i] * 1.05
            else:
                outs[i] = outs[i].flip(0)
            return outs[0] if isinstance(out, torch.Tensor) else tuple(outs)

        error = check_against_reference(name, perturbed, ref, torch.device("cpu"), dtype)
        assert error is not None and error.startswith(f"output {i}:"), (name, i, error)


def test_tolerance_rule():
    ref64 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    same = ref64.float() + torch.tensor([1e-6, 0.0, 0.0])
    assert tolerance_violation(ref64.float(), same, ref64) is None
    assert tolerance_violation(ref64.float() + torch.tensor([2e-6, 0.0, 0.0]), same, ref64) is None  # 2x ref error
    assert "1 of 3 entries off" in tolerance_violation(ref64.float() + torch.tensor([0.0, 1e-5, 0.0]), same, ref64)
    assert "1 of 3 entries off" in tolerance_violation(torch.tensor([1.0, float("nan"), 3.0]), same, ref64)
    assert "shape (2,)" in tolerance_violation(ref64[:2].float(), same, ref64)


def test_check_all_reports_what_serves_each_op_and_dtype(serve):
    serve("lora_expand_combine", [("bad", lambda *a: backend._REFERENCES["lora_expand_combine"](*a).neg())])
    with pytest.warns(backend.BackendWarning, match="mixlora::lora_expand_combine: backend 'bad' failed"):
        served = backend.check_all("cpu", (torch.float32, torch.bfloat16))
    assert set(served) == OPS
    assert served["lora_expand_combine"] == {"float32": "torch", "bfloat16": "torch"}
    assert [f["dtype"] for f in backend.fallbacks()[-2:]] == ["torch.float32", "torch.bfloat16"]
    assert served["route"] == {"float32": "torch", "bfloat16": "torch"}  # no kernel backend has route on the CPU
