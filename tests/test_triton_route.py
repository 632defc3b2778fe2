"""Triton `route` / `route_backward` launchers against the float64 reference ops (interpreter, CPU)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from backend_checks import assert_tolerance, reference  # noqa: E402
from test_triton_common import requires_interpreter  # noqa: E402

from mixlora_kernels.triton.route import route_backward, route_forward  # noqa: E402

pytestmark = requires_interpreter

CASES = [
    # T, E, K
    (1, 4, 2),    # T=1
    (70, 5, 2),   # prime E; T above one 64-row block
    (9, 8, 1),    # K=1 (weights are all 1, gradient all 0)
    (9, 3, 3),    # K=E (non-pow2 K: BLOCK_K padding)
]


@pytest.mark.parametrize("T,E,K", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route(T, E, K, dtype):
    torch.manual_seed(T + E + K)
    logits = torch.randn(T, E).to(dtype)
    gw = torch.randn(T, K)
    w, e = route_forward(logits, K)
    w64, e64 = torch.ops.mixlora.route(logits.double(), K)
    assert w.dtype == torch.float32 and e.dtype == torch.int64
    assert torch.equal(e, e64)  # the same experts in the same order (random logits: no ties)
    assert_tolerance(w, reference("route")(logits, K)[0], w64, "weights")  # the softmax runs in fp32 for every dtype
    d = route_backward(gw, w, e, E)
    d64 = torch.ops.mixlora.route_backward(gw.double(), w64, e64, E)
    assert d.dtype == torch.float32
    assert_tolerance(d, reference("route_backward")(gw, w, e, E), d64, "dlogits")


# Non-contiguous logits (a column slice) and non-contiguous weight/expert tensors in the backward.
def test_route_noncontiguous():
    torch.manual_seed(1)
    logits = torch.randn(11, 9)[:, 1:8]
    w, e = route_forward(logits, 3)
    w64, e64 = torch.ops.mixlora.route(logits.double(), 3)
    assert torch.equal(e, e64)
    assert_tolerance(w, reference("route")(logits, 3)[0], w64, "weights")
    gw = torch.randn(3, 11).T
    d = route_backward(gw, w.T.contiguous().T, e.T.contiguous().T, 7)
    assert_tolerance(d, reference("route_backward")(gw, w, e, 7),
                     torch.ops.mixlora.route_backward(gw.double(), w64, e64, 7), "dlogits")


def test_route_rejects_bad_top_k():
    with pytest.raises(ValueError, match="top_k must be in"):
        route_forward(torch.randn(4, 3), 4)


# A row with a NaN logit (a diverged model) must route to valid experts, as the reference does: experts 0..K-1 with
# NaN weights; rows without NaN are unaffected. An out-of-range id would trip a device assert and kill the context.
def test_route_nan_rows_get_valid_experts_like_the_reference():
    torch.manual_seed(2)
    logits = torch.randn(6, 5)
    logits[1, 3] = float("nan")
    logits[4] = float("nan")
    w, e = route_forward(logits, 2)
    w64, e64 = torch.ops.mixlora.route(logits.double(), 2)
    assert torch.equal(e, e64)
    assert e[1].tolist() == [0, 1] and e[4].tolist() == [0, 1]
    assert torch.isnan(w[[1, 4]]).all() and not torch.isnan(w[[0, 2, 3, 5]]).any()
    assert_tolerance(w[[0, 2, 3, 5]], reference("route")(logits, 2)[0][[0, 2, 3, 5]], w64[[0, 2, 3, 5]], "weights")
