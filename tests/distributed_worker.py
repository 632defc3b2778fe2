"""One rank of `tests/test_distributed.py`: train a tiny MixLoRA model under DDP and FSDP2, record every step.

Launched as `torchrun --standalone --nproc_per_node=N tests/distributed_worker.py OUT_DIR` (gloo, CPU). Every rank
builds the same float64 model, takes rows [rank·b, (rank+1)·b) of the same global batch and runs STEPS AdamW steps
on the adapter parameters under each engine below. Rank r writes `OUT_DIR/rank{r}.pt`: per run, per step, the loss,
the synchronised gradients and the updated adapter weights (full tensors), and the slots each expert received from
this rank's tokens. FSDP2 also records how much of each adapter parameter this rank holds; where torch has no
FSDP2, its entry is the reason instead of steps.

The test imports the model, the batch, its sharding and the optimiser settings from here, so the single-process
reference is built the same way.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from conftest import randomize_adapters, tiny_model

from mixlora import MixLoraConfig, adapter_state_dict, get_mixlora_model, moe_layers

STEPS = 3
ROWS_PER_RANK = 2
SEQ_LEN = 8
LR = 1e-2
# 8 experts for 16 tokens (32 slots) per rank: some expert gets no token on some rank in some step, which is the
# case DDP's `find_unused_parameters=False` must survive (the test checks that it happened).
NUM_EXPERTS = 8


def build_model(router_aux_loss_coef: float) -> torch.nn.Module:
    """The tiny float64 llama MixLoRA model every rank and the reference start from (same seeds, no dropout)."""
    model = tiny_model("llama", dtype=torch.float64)
    config = MixLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, num_experts=NUM_EXPERTS, top_k=2,
                           router_aux_loss_coef=router_aux_loss_coef,
                           target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
    get_mixlora_model(model, config)
    # Random B (zero by default) so that every adapter gradient is non-zero from the first step.
    randomize_adapters(model, seed=1)
    return model.train()


def global_batch(world_size: int) -> torch.Tensor:
    """(world_size·ROWS_PER_RANK, SEQ_LEN) token ids, one per step; no padding, so all shards have equal token counts."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 96, (STEPS, world_size * ROWS_PER_RANK, SEQ_LEN), generator=g)


def shard(batch: torch.Tensor, rank: int) -> torch.Tensor:
    return batch[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]


def _local_expert_slots(model: torch.nn.Module) -> torch.Tensor:
    """(layers, E) slots per expert from this rank's tokens in the last forward.

    Taken from the kept router logits rather than the `expert_load` buffer: DDP's default broadcast_buffers=True
    overwrites every rank's buffers with rank 0's at each forward, so that counter is not per rank under DDP.
    """
    counts = []
    for moe in moe_layers(model):
        chosen = torch.topk(moe.adapters.default.router_logits, moe.adapters.default.top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.reshape(-1), minlength=moe.adapters.default.num_experts))
    return torch.stack(counts)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the whole value (FSDP2 parameters and gradients are sharded DTensors)."""
    t = t.full_tensor() if hasattr(t, "full_tensor") else t
    return t.detach().clone()


def _train(wrapped: torch.nn.Module, model: torch.nn.Module, batch: torch.Tensor, rank: int, opt=None,
           backward=None) -> list[dict]:
    """STEPS steps of `opt` (default: a fresh AdamW over the adapters) on this rank's shards; `backward(loss)`
    defaults to `loss.backward()` (accelerate_worker.py passes its prepared optimizer and `accelerator.backward`)."""
    params = adapter_state_dict(model)
    opt = torch.optim.AdamW(params.values(), lr=LR) if opt is None else opt
    backward = torch.Tensor.backward if backward is None else backward
    steps = []
    for ids in batch:
        local = shard(ids, rank)
        out = wrapped(input_ids=local, labels=local)
        backward(out.loss)
        grads = {n: _full(p.grad) for n, p in params.items()}
        opt.step()
        opt.zero_grad()
        steps.append({"loss": out.loss.detach().clone(), "slots": _local_expert_slots(model), "grads": grads,
                      "weights": {n: _full(p) for n, p in params.items()}})
    return steps


def run_ddp(batch: torch.Tensor, rank: int, router_aux_loss_coef: float) -> list[dict]:
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(router_aux_loss_coef)
    # find_unused_parameters=False: experts stack their LoRAs in one tensor per projection, so an expert that gets
    # no token on this rank still receives a (zero) gradient slice and every trainable parameter is reduced.
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    return _train(ddp, model, batch, rank)


def run_fsdp2(batch: torch.Tensor, rank: int, router_aux_loss_coef: float) -> tuple[list[dict], dict]:
    """FSDP2 on every decoder layer and the root; returns the steps and, per adapter parameter, (elements held by
    this rank, elements in all)."""
    from torch.distributed.fsdp import fully_shard

    from mixlora.model import decoder_layers

    model = build_model(router_aux_loss_coef)
    # Each layer's frozen base weights and trainable adapters share one FSDP2 parameter group: FSDP2 shards every
    # parameter on its own and reduces gradients only for those that require them.
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    shards = {n: (p.to_local().numel(), p.numel()) for n, p in adapter_state_dict(model).items()}
    return _train(model, model, batch, rank), shards


def main(out_dir: str) -> None:
    # A rank that fails leaves the other blocked in a collective: time out well before the test's own limit.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch(world)
    results: dict[str, object] = {}
    # Each engine's model and optimiser are built from scratch; the runs share only the global batch.
    results["ddp"] = run_ddp(batch, rank, router_aux_loss_coef=0.1)
    results["ddp_no_aux"] = run_ddp(batch, rank, router_aux_loss_coef=0.0)
    # FSDP2 is public as `torch.distributed.fsdp.fully_shard` from torch 2.6 (the project allows torch>=2.4); where
    # it exists it runs on CPU with gloo (checked with torch 2.14.1), so any other error is a failure, not a skip.
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        results["fsdp2"] = f"torch {torch.__version__}: {err}"
    else:
        results["fsdp2"], results["fsdp2_shards"] = run_fsdp2(batch, rank, router_aux_loss_coef=0.1)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
