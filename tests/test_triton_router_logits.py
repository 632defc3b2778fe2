"""Triton `router_logits` / `router_logits_backward` launchers against the float64 reference ops (interpreter, CPU).

Fresh random inputs per case (x in fp32 / bf16 / fp16, the router weight and the logits' gradient fp32, as a model
passes them), odd H, T not a multiple of the 32-row block, E 1 / 5 / 8 (one expert group) and 11 (two groups), the
unmasked (T and H multiples of the block) and the masked paths, several dW chunks; the tolerance rule of
`backend_checks` against the float64 reference, ref_same the reference on the same inputs (the kernels are exact
fp32: no MMA operand rounding to model).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from backend_checks import assert_tolerance, reference  # noqa: E402
from test_triton_common import requires_interpreter  # noqa: E402

from mixlora_kernels.triton import router_logits as rl  # noqa: E402
from mixlora_kernels.triton.router_logits import router_logits_backward, router_logits_forward  # noqa: E402

pytestmark = requires_interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = [
    # T, H, E
    (37, 77, 5),   # T not a multiple of 32, odd H, prime E
    (70, 33, 8),   # the model's E; three row blocks, the last partial
    (45, 19, 1),   # one expert; H below one 32-column tile
    (64, 96, 8),   # T and H multiples of the tiles: the unmasked loads and stores
    (40, 23, 11),  # E > MAX_EG: two expert groups (forward, dW) and dx's loop over the experts past the first 8
    (1, 1, 1),
]


def _inputs(T, H, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = torch.randn(E, H, generator=gen) * 0.3
    g = torch.randn(T, E, generator=gen)
    return x, w, g


def _check(x, w, g, what=""):
    logits = router_logits_forward(x, w)
    assert logits.dtype == torch.float32 and logits.shape == (x.shape[0], w.shape[0])
    assert_tolerance(logits, reference("router_logits")(x, w),
                     torch.ops.mixlora.router_logits(x.double(), w.double()), f"logits {what}")
    dx, dw = router_logits_backward(g, x, w)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype
    dx_same, dw_same = reference("router_logits_backward")(g, x, w)
    dx64, dw64 = torch.ops.mixlora.router_logits_backward(g.double(), x.double(), w.double())
    assert_tolerance(dx, dx_same, dx64, f"dx {what}")
    assert_tolerance(dw, dw_same, dw64, f"dW {what}")


@pytest.mark.parametrize("T,H,E", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_logits_forward_and_gradients(T, H, E, dtype):
    x, w, g = _inputs(T, H, E, dtype, seed=1000 * T + 10 * H + E + DTYPES.index(dtype))
    _check(x, w, g, f"T {T} H {H} E {E} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dw_over_several_chunks(monkeypatch, dtype):
    """dW sums fixed chunks of T (partials, then a fixed-order sum): 5 chunks of 64 rows, the last one partial."""
    monkeypatch.setattr(rl, "CHUNK_T", 64)
    x, w, g = _inputs(300, 41, 8, dtype, seed=7 + DTYPES.index(dtype))
    _check(x, w, g, "5 chunks")


def test_noncontiguous_inputs():
    """x a column slice, the weight a transposed copy, the gradient a transposed view: read through their strides."""
    x, w, g = _inputs(50, 60, 5, torch.bfloat16, seed=3)
    x = x[:, 7:52]
    w = w[:, :45].T.contiguous().T
    g = g.T.contiguous().T
    assert not (x.is_contiguous() or w.is_contiguous() or g.is_contiguous())
    _check(x, w, g, "non-contiguous")


def test_registered_op_autograd_through_the_kernels(monkeypatch):
    """torch.ops.mixlora.router_logits and its registered backward served by the Triton launchers (CPU tensors,
    interpreter; the first-use self-check off, so that a wrong kernel is not replaced by the reference): x.grad and
    W.grad against float64 autograd of the reference."""
    from mixlora_kernels import backend, ops

    monkeypatch.setenv("MIXLORA_SELFTEST", "0")
    saved_chains, saved_chosen = dict(backend._CHAINS), dict(backend._CHOSEN)
    backend._serve("router_logits", "cpu", [("triton", router_logits_forward)])
    backend._serve("router_logits_backward", "cpu", [("triton", router_logits_backward)])
    try:
        assert backend.selected("cpu")["router_logits_backward"] == "triton"
        x, w, g = _inputs(37, 29, 8, torch.bfloat16, seed=11)
        x.requires_grad_()
        w.requires_grad_()
        ops.router_logits(x, w).backward(g)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        (x64 @ w64.T).backward(g.double())
        dx_same, dw_same = reference("router_logits_backward")(g, x.detach(), w.detach())
        assert_tolerance(x.grad, dx_same, x64.grad, "x.grad")
        assert_tolerance(w.grad, dw_same, w64.grad, "W.grad")
    finally:
        backend._CHAINS.clear()
        backend._CHAINS.update(saved_chains)
        backend._CHOSEN.clear()
        backend._CHOSEN.update(saved_chosen)


def test_empty_and_zero_width():
    w = torch.randn(5, 8)
    assert router_logits_forward(torch.randn(0, 8), w).shape == (0, 5)
    dx, dw = router_logits_backward(torch.randn(0, 5), torch.randn(0, 8), w)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(5, 8))
    assert torch.equal(router_logits_forward(torch.randn(3, 0), torch.randn(5, 0)), torch.zeros(3, 5))


def test_input_errors_name_the_op_and_tensor():
    x, w, g = _inputs(6, 10, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"mixlora::router_logits: weight must have shape \(\*, 10\), got \(4, 9\)"):
        router_logits_forward(x, w[:, :9])
    with pytest.raises(ValueError, match=r"router_logits_backward: grad must have shape \(6, 4\), got \(6, 3\)"):
        router_logits_backward(g[:, :3], x, w)
    with pytest.raises(ValueError, match=r"router_logits: x has dtype torch.float64; the Triton kernels support"):
        router_logits_forward(x.double(), w)
