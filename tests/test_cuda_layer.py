"""The whole MixLoRA FFN on a GPU, through the op registry, for every kernel backend.

The layer runs on CUDA with each backend installed (`mixlora_kernels.backend.use`) and is compared, output and every
gradient (x, router, each expert A/B), with the loop-simple float64 oracle (tests/reference.py) on CPU copies of the
same parameters, by the whole-layer form of the rule of `mixlora_kernels.selftest`: the error (a norm) ≤ 2× the torch
reference's own error in the same dtype (the `torch` backend on the same GPU) + 1e-2 of the scale, as a chain of
ops compounds the per-op rounding the per-element rule allows. `opcheck` runs every op with CUDA inputs under
each backend. Marked `cuda`: skipped without a GPU. On a GPU every backend must have loaded: the list is fixed here,
not taken from the registry under test, so a backend that fails to load fails these tests instead of vanishing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from reference import reference_moe_forward
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from mixlora import MixLoraConfig, MixLoraSparseMoe
from mixlora_kernels import backend, ops

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["torch", "triton", "cuda"]


@pytest.fixture(autouse=True)
def _backend_loaded(request):
    name = request.node.callspec.params.get("backend_name", "torch") if hasattr(request.node, "callspec") else "torch"
    if name != "torch" and name not in backend.loaded():
        pytest.fail(f"backend {name!r} did not load on this GPU machine: {backend.load_errors().get(name)}")


def _layer(H=96, I=160, E=5, K=2, R=8, dropout=0.0, seed=0):
    """A float64 CPU MixLoRA FFN with random (non-zero) LoRA B and router."""
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu")).double()
    config = MixLoraConfig(r=R, lora_alpha=2 * R, num_experts=E, top_k=K, lora_dropout=dropout,
                           target_modules=["gate_proj", "up_proj", "down_proj"])
    moe = MixLoraSparseMoe(mlp, {"default": config}, "silu")
    with torch.no_grad():
        for lora in moe.adapters.default.experts.values():
            lora.lora_B.normal_(std=0.2)
        moe.adapters.default.moe_gate.weight.normal_(std=0.5)
    return moe


def _run(moe, x, grad):
    x = x.detach().clone().requires_grad_()
    y = moe(x)
    params = [x] + [p for p in moe.parameters() if p.requires_grad]
    return [y.detach()] + [g.detach() for g in torch.autograd.grad(y, params, grad)]


def _err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K", [(1, 2), (77, 2), (64, 1), (40, 5)])  # T=1; T not a block multiple; K=1; K=E
def test_layer_matches_oracle_on_gpu(backend_name, dtype, T, K):
    moe64 = _layer(K=K)
    gpu = copy.deepcopy(moe64).to("cuda", dtype)  # the router stays fp32
    x = torch.randn(T, 96, dtype=torch.float64)
    grad = torch.randn(T, 96, dtype=torch.float64)
    oracle_x = x.clone().requires_grad_()
    oracle_y, _ = reference_moe_forward(moe64, oracle_x, "silu")
    params = [oracle_x] + [p for p in moe64.parameters() if p.requires_grad]
    oracle = [oracle_y.detach()] + list(torch.autograd.grad(oracle_y, params, grad))
    xg, gg = x.to("cuda", dtype), grad.to("cuda", dtype)
    with backend.use("torch"):
        same_dtype = _run(gpu, xg, gg)
    with backend.use(backend_name) as used:
        assert backend_name == "torch" or backend_name in used.values()
        ours = _run(gpu, xg, gg)
    names = ["y", "x"] + [n for n, p in gpu.named_parameters() if p.requires_grad]
    for name, a, t, r in zip(names, ours, same_dtype, oracle, strict=True):
        if K == 1 and name.endswith("moe_gate.weight"):  # a single renormalised weight is 1: no router gradient
            assert a.abs().max() <= 1e-6, name
            continue
        scale = r.abs().max().item()
        if dtype == torch.float32:
            assert _err(a, r) <= 1e-4 * scale + 1e-6, name
        else:
            assert _err(a, r) <= 2 * _err(t, r) + 1e-2 * scale, name


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_dropout_is_the_same_mask_on_every_backend(backend_name):
    gpu = _layer(dropout=0.3).to("cuda", torch.float32)
    gpu.train()
    x = torch.randn(50, 96, device="cuda")
    grad = torch.randn(50, 96, device="cuda")
    torch.manual_seed(7)
    with backend.use("torch"):
        want = _run(gpu, x, grad)
    torch.manual_seed(7)  # the same dropout seeds: the hashed masks must agree bit for bit, so results agree closely
    with backend.use(backend_name):
        got = _run(gpu, x, grad)
    for a, b in zip(got, want, strict=True):
        assert _err(a, b) <= 1e-4 * b.abs().max().item() + 1e-6


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_opcheck_every_op_on_cuda(backend_name):
    gpu = _layer().to("cuda", torch.float32)
    x = torch.randn(33, 96, device="cuda", requires_grad=True)
    with backend.use(backend_name):
        logits = ops.router_logits(x, gpu.adapters.default.moe_gate.weight)
        weights, experts = ops.route(logits, 2)
        order, offsets = ops.sort_slots(experts, 5)
        A = torch.cat([gpu.adapters.default.experts["gate_proj"].lora_A, gpu.adapters.default.experts["up_proj"].lora_A], 1).detach()
        z = ops.lora_shrink(x, A, experts, order, offsets, 0.1, 3).detach()
        G, U = torch.randn(33, 160, device="cuda"), torch.randn(33, 160, device="cuda")
        Bg, Bu = gpu.adapters.default.experts["gate_proj"].lora_B.detach(), gpu.adapters.default.experts["up_proj"].lora_B.detach()
        Ad, Bd = gpu.adapters.default.experts["down_proj"].lora_A.detach(), gpu.adapters.default.experts["down_proj"].lora_B.detach()
        zd = torch.randn(66, 8, device="cuda")
        cases = [
            (ops.router_logits, (x, gpu.adapters.default.moe_gate.weight)),
            (ops.route, (logits.detach().requires_grad_(), 2)),
            (ops.sort_slots, (experts, 5)),
            (ops.lora_shrink, (x, A.requires_grad_(), experts, order, offsets, 0.1, 3)),
            (ops.expand_act_combine, (G.requires_grad_(), U.requires_grad_(), z[:, :8], Bg.requires_grad_(),
                                      z[:, 8:], Bu.requires_grad_(), weights.detach().requires_grad_(), experts,
                                      order, offsets, Ad.requires_grad_(), 2.0, "silu", 0.1, 5)),
            (ops.lora_expand_combine, (zd.requires_grad_(), Bd.requires_grad_(), weights.detach(), experts, order,
                                       offsets, 2.0)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                        "test_faketensor"))
