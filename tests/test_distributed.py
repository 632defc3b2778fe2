"""MixLoRA trains under the standard distributed engines (DDP, FSDP2) with no communication of its own.

One `torchrun --standalone --nproc_per_node=2` launch of `distributed_worker.py` (gloo, CPU, float64) trains the
same tiny llama MixLoRA model under DDP and FSDP2 for a few AdamW steps; this process checks the recorded gradients
and updated adapter weights against each other and against a single-process reference.

Semantics of the router aux loss under data parallelism: each rank computes the load-balancing loss on its own
tokens (the statistics f_e, P_e are per-rank means), and the engine averages the gradients over ranks. The training
objective is therefore mean_r loss(shard_r), not the loss of the concatenated global batch: the aux loss is a product
of batch means, so it does not split over shards. This is the standard behaviour of MoE training under DDP/FSDP
(e.g. Hugging Face Mixtral), and the reference below computes exactly that objective.

Tolerance: rel ≤ 1e-10 with rel = max|x − ref| / max|ref| per tensor. Everything runs in float64; the engines and the
reference compute the same sums in possibly different orders (DDP divides each rank's gradient by the world size and
all-reduces, the reference lets autograd accumulate the two halves, FSDP reduce-scatters), so they may differ by a
few float64 roundings (~1e-16 relative, amplified at most by the three AdamW steps) but never by 1e-10.

A second launch, `accelerate launch` of `accelerate_worker.py`, runs the same DDP training through
`Accelerator(cpu=True).prepare(model, optimizer)` and `accelerator.backward`, checked against the same reference.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from mixlora import adapter_state_dict

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from distributed_worker import LR, STEPS, build_model, global_batch, shard  # noqa: E402

WORLD_SIZE = 2
RTOL = 1e-10
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
ACCELERATE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_worker.py")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).abs().max() / ref.abs().max()).item()


def _assert_close(name: str, x: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 0, f"{name}: reference is zero, the comparison would test nothing"
    assert _rel(x, ref) <= RTOL, f"{name}: rel {_rel(x, ref):.3e} > {RTOL}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The worker's records, one dict per rank (see distributed_worker.py)."""
    out = tmp_path_factory.mktemp("distributed")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}", WORKER,
           str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    print(f"torchrun: {time.perf_counter() - start:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


@functools.cache
def _reference(router_aux_loss_coef: float, concatenated: bool = False) -> list[dict]:
    """Single-process training of the worker's model: per step, the gradient of mean_r loss(shard_r) (or, with
    `concatenated`, of the loss of the whole global batch) and the weights after the same AdamW step. Cached (the
    DDP and accelerate tests share it); callers only read it."""
    model = build_model(router_aux_loss_coef)
    params = adapter_state_dict(model)
    opt = torch.optim.AdamW(params.values(), lr=LR)
    steps = []
    for ids in global_batch(WORLD_SIZE):
        if concatenated:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = sum(model(input_ids=shard(ids, r), labels=shard(ids, r)).loss for r in range(WORLD_SIZE))
            loss = loss / WORLD_SIZE
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad()
        steps.append({"grads": grads, "weights": {n: p.detach().clone() for n, p in params.items()}})
    return steps


def _check_run(run: list[dict], ref: list[dict], what: str) -> None:
    assert len(run) == len(ref) == STEPS
    for step, (got, want) in enumerate(zip(run, ref, strict=True)):
        assert got["grads"].keys() == want["grads"].keys()
        for key in ("grads", "weights"):
            for name, ref_tensor in want[key].items():
                _assert_close(f"{what} step {step} {key} {name}", got[key][name], ref_tensor)


def _check_ranks_identical(ranks: list[dict], run: str) -> None:
    for step in range(STEPS):
        first = ranks[0][run][step]
        for other in ranks[1:]:
            for key in ("grads", "weights"):
                for name, tensor in first[key].items():
                    assert torch.equal(other[run][step][key][name], tensor), f"{run} step {step} {key} {name}"


def test_ddp_matches_single_process_mean_of_shard_losses(ranks):
    _check_ranks_identical(ranks, "ddp")
    _check_run(ranks[0]["ddp"], _reference(router_aux_loss_coef=0.1), "ddp")


def test_ddp_idle_expert_needs_no_find_unused_parameters(ranks):
    # The worker wraps with find_unused_parameters=False; if a parameter had received no gradient on a rank, the
    # next step's forward would have raised. Check that the case occurred: some expert of some layer got no slot
    # from some rank's tokens in some step.
    assert any((step["slots"] == 0).any() for rank in ranks for step in rank["ddp"])


def test_ddp_without_aux_loss_matches_concatenated_batch(ranks):
    # With router_aux_loss_coef=0 the loss is the token-mean cross-entropy. Every shard has the same number of
    # label tokens (no padding, equal rows and length), so mean_r loss(shard_r) is exactly the mean over the
    # concatenated batch, and routing is per token: the DDP run is the single-process run on the whole batch.
    _check_ranks_identical(ranks, "ddp_no_aux")
    _check_run(ranks[0]["ddp_no_aux"], _reference(router_aux_loss_coef=0.0, concatenated=True), "ddp_no_aux")


def test_aux_loss_is_per_rank(ranks):
    # With the aux loss on, the concatenated-batch objective is a different one: the router gradient differs at
    # the first step by far more than the tolerance (which shows the tests above can tell the two apart).
    concatenated = _reference(router_aux_loss_coef=0.1, concatenated=True)[0]["grads"]
    gates = [n for n in concatenated if "moe_gate" in n]
    assert gates
    assert all(_rel(ranks[0]["ddp"][0]["grads"][n], concatenated[n]) > 1e-4 for n in gates)


def test_fsdp2_matches_ddp(ranks):
    result = ranks[0]["fsdp2"]
    if isinstance(result, str):
        pytest.skip(f"no FSDP2 (torch.distributed.fsdp.fully_shard) in this torch: {result}")
    # Every adapter parameter was really sharded across the ranks.
    for name, (local, full) in ranks[0]["fsdp2_shards"].items():
        assert local < full, f"{name}: local shard {local} of {full} elements"
    # Same objective as DDP (each rank's own aux loss, gradients averaged over ranks); with torch 2.14.1 the two
    # runs agree bitwise, but the engines' reduction orders are not a contract, hence the float64 tolerance.
    _check_ranks_identical(ranks, "fsdp2")
    for step in result:
        assert torch.isfinite(step["loss"])
    _check_run(result, ranks[0]["ddp"], "fsdp2 vs ddp")


@pytest.fixture(scope="module")
def accelerate_ranks(tmp_path_factory):
    """accelerate_worker.py's records, one dict per process, from one `accelerate launch` of 2 CPU processes.

    `--cpu --num_processes 2` is not the way to get them: with accelerate 1.15 `--cpu` goes to its simple launcher,
    which starts `num_processes` processes only through `mpirun` (`--mpirun_hostfile`, MPI/oneCCL); without it,
    it starts ONE plain python process (checked: DistributedType.NO, 1 process). `--multi_gpu` goes to torchrun
    (torch.distributed.run) and needs no GPU: the worker's `Accelerator(cpu=True)` turns the torchrun-launched
    processes into a MULTI_CPU gloo group (also on a machine that has GPUs). Everything is passed on the command
    line; HF_HOME and ACCELERATE_CONFIG_FILE point into a fresh tmp dir and inherited ACCELERATE_* variables are
    dropped, so no user or machine accelerate config is read. `--main_process_port 0` picks a free port.
    """
    out = tmp_path_factory.mktemp("accelerate")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env["HF_HOME"] = str(out / "hf_home")
    env["ACCELERATE_CONFIG_FILE"] = str(out / "hf_home" / "no_accelerate_config.yaml")  # never created
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={WORLD_SIZE}",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", "--main_process_port=0",
           ACCELERATE_WORKER, str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, check=False)
    assert proc.returncode == 0, (f"accelerate launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-8000:]}")
    print(f"accelerate launch: {time.perf_counter() - start:.1f} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_accelerate_launch_runs_two_gloo_ddp_processes(accelerate_ranks):
    for rank, record in enumerate(accelerate_ranks):
        state = record["state"]
        assert state["distributed_type"] == "DistributedType.MULTI_CPU", state
        assert state["backend"] == "gloo", state
        assert state["num_processes"] == state["torch_world_size"] == WORLD_SIZE, state
        assert state["process_index"] == rank, state
        assert state["device"].startswith("cpu"), state
        assert state["mixed_precision"] == "no", state
        # prepare() wrapped the model in DDP and kept the very adapter parameters the optimiser updates.
        assert state["wrapper"] == "DistributedDataParallel", state
        assert state["same_params"] and state["model_params_same"], state


def test_accelerate_matches_single_process_mean_of_shard_losses(accelerate_ranks):
    # Same objective as the hand-wrapped DDP run (each rank's own aux loss, gradients averaged over ranks).
    runs = [{"accelerate": record["steps"]} for record in accelerate_ranks]
    _check_ranks_identical(runs, "accelerate")
    for step in runs[0]["accelerate"]:
        assert torch.isfinite(step["loss"])
    _check_run(runs[0]["accelerate"], _reference(router_aux_loss_coef=0.1), "accelerate")
