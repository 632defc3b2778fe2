"""The files of a `mixlora train` run besides the adapters: the output directory, and the training checkpoints
(`checkpoints/step-NNNNNN/`: the adapters + `trainer_state.pt` with optimizer, scheduler, RNG, step and history),
written atomically and read back for `resume`."""

from __future__ import annotations

import os
import random
import shutil
import uuid
from typing import Any

from mixlora.fileio import AdapterFileError
from mixlora.train_config import TrainConfig

SUMMARY_NAME = "train_summary.json"
LOSS_PLOT_NAME = "loss.png"
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE_NAME = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    checkpoints = _checkpoint_steps(output_dir)
    return checkpoints[0] if checkpoints else None


def _checkpoint_steps(output_dir: str) -> list[str]:
    """The checkpoint directories `checkpoints/step-*` with a trainer state, latest first."""
    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return []
    done = [n for n in os.listdir(folder) if n.startswith("step-")
            and os.path.isfile(os.path.join(folder, n, TRAINER_STATE_NAME))]
    return [os.path.join(folder, n) for n in sorted(done, reverse=True)]


def _read_checkpoint(checkpoint: str, subdirs: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(trainer state, the published weights of the adapter in each of `subdirs` ('' = the checkpoint directory
    itself)) of a checkpoint directory; `AdapterFileError` names the file that cannot be read."""
    from mixlora.checkpoint import read_adapter, read_torch_file

    state = read_torch_file(os.path.join(checkpoint, TRAINER_STATE_NAME), weights_only=False)
    if not isinstance(state, dict) or "step" not in state:
        raise AdapterFileError(os.path.join(checkpoint, TRAINER_STATE_NAME), "is not a `mixlora train` trainer state")
    return state, [read_adapter(os.path.join(checkpoint, d))[1] for d in subdirs]


def resume_state(output_dir: str, subdirs: list[str]):
    """(checkpoint directory, trainer state, weights per run) of the latest checkpoint, or (None, None, None). A
    damaged latest checkpoint raises `AdapterFileError` that says what is damaged and whether an earlier
    checkpoint can be read (nothing is skipped silently: resuming from an older step is the user's choice)."""
    checkpoints = _checkpoint_steps(output_dir)
    if not checkpoints:
        return None, None, None
    latest = checkpoints[0]
    try:
        return (latest, *_read_checkpoint(latest, subdirs))
    except (AdapterFileError, FileNotFoundError) as error:
        damage = str(error)
    usable = None
    for earlier in checkpoints[1:]:
        try:
            _read_checkpoint(earlier, subdirs)
        except (AdapterFileError, FileNotFoundError):
            continue
        usable = earlier
        break
    if usable is not None:
        advice = (f"the earlier checkpoint {os.path.basename(usable)} is intact: delete {latest} to resume from it")
    else:
        advice = "no earlier checkpoint is intact: train again with --overwrite instead of --resume"
    raise AdapterFileError(latest, f"checkpoint is damaged ({damage}); {advice}")


def run_outputs(cfg: TrainConfig) -> list[str]:
    """The files and directories a run writes into its output directory (a multi-adapter run also writes one adapter
    directory per name); `overwrite` removes exactly these."""
    from mixlora.checkpoint import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from mixlora.config import CONFIG_NAME
    from mixlora.evaluate import EXPERT_LOAD_PLOT_NAME

    names = [CONFIG_NAME, WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME, SUMMARY_NAME, LOSS_PLOT_NAME, EXPERT_LOAD_PLOT_NAME,
             CHECKPOINTS_DIR, *(cfg.adapters or {})]
    return [os.path.join(cfg.output_dir, name) for name in names]


def prepare_output_dir(cfg: TrainConfig) -> None:
    """Refuse a file, or a non-empty directory without `overwrite`/`resume`; with `overwrite`, remove an earlier
    run's outputs."""
    out = cfg.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise AdapterFileError(out, "is a file; --output-dir must be a directory (it is created if missing)")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries or cfg.resume:
        return
    if not cfg.overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise ValueError(f"output directory {out} is not empty ({shown}): pass --overwrite to replace an earlier "
                         "run's outputs there, --resume to continue its checkpoints, or another --output-dir")
    for path in run_outputs(cfg):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def save_checkpoint(output_dir: str, save, state: dict[str, Any], keep: int) -> str:
    """`save(directory)` (the adapters) + trainer state into checkpoints/step-NNNNNN, atomically (temp dir, then
    os.replace)."""
    import torch

    folder = os.path.join(output_dir, CHECKPOINTS_DIR)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"step-{state['step']:06d}")
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        save(tmp)
        torch.save(state, os.path.join(tmp, TRAINER_STATE_NAME))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        done = sorted(n for n in os.listdir(folder) if n.startswith("step-"))
        for name in done[:-keep]:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return final
