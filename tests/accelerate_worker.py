"""One process of `tests/test_distributed.py::test_accelerate_*`: the DDP run of distributed_worker.py, set up by
Hugging Face accelerate instead of by hand.

Launched by `accelerate launch --multi_gpu --num_processes 2 ... tests/accelerate_worker.py OUT_DIR` on a machine
without accelerators (see the test for why `--multi_gpu` and not `--cpu`). `Accelerator(cpu=True)` makes the
launched processes one gloo MULTI_CPU group; every process builds the same float64 model as distributed_worker.py,
hands it and an AdamW over its adapters to `accelerator.prepare`, and runs the same STEPS steps on its shard of the
same global batch with `accelerator.backward` and the prepared optimiser. Process r writes `OUT_DIR/rank{r}.pt`:
the accelerate state it ran under and, per step, the loss, the synchronised gradients and the updated adapter
weights (same record as distributed_worker.py's runs).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from distributed_worker import LR, _train, build_model, global_batch

from mixlora import adapter_state_dict


def main(out_dir: str) -> None:
    # A process that fails leaves the other blocked in a collective: time out well before the test's own limit.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=90))
    accelerator = Accelerator(cpu=True, kwargs_handlers=[timeout])
    rank, world = accelerator.process_index, accelerator.num_processes
    state = {"distributed_type": str(accelerator.distributed_type), "backend": str(accelerator.state.backend),
             "num_processes": world, "process_index": rank, "device": str(accelerator.device),
             "torch_world_size": dist.get_world_size() if dist.is_initialized() else 1}
    model = build_model(router_aux_loss_coef=0.1)
    params = adapter_state_dict(model)
    opt = torch.optim.AdamW(params.values(), lr=LR)
    wrapped, prepared_opt = accelerator.prepare(model, opt)
    state["wrapper"] = type(wrapped).__name__
    state["mixed_precision"] = str(accelerator.mixed_precision)
    # prepare() must neither copy the adapters nor re-create the optimiser: the steps below read the gradients and
    # weights from `params`, the objects the prepared optimiser updates.
    opt_params = [p for group in prepared_opt.optimizer.param_groups for p in group["params"]]
    state["same_params"] = len(opt_params) == len(params) and all(
        a is b for a, b in zip(opt_params, params.values(), strict=True))
    unwrapped = adapter_state_dict(accelerator.unwrap_model(wrapped)).values()
    state["model_params_same"] = all(a is b for a, b in zip(unwrapped, params.values(), strict=True))
    steps = _train(wrapped, model, global_batch(world), rank, opt=prepared_opt, backward=accelerator.backward)
    torch.save({"state": state, "steps": steps}, os.path.join(out_dir, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
