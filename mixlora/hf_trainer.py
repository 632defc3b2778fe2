"""`MixLoraTrainer`: `transformers.Trainer` that saves and resumes MixLoRA adapters in the published format.

Its own module because importing `transformers.Trainer` takes seconds; `mixlora.train.MixLoraTrainer` is the same
class, loaded on first use.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from mixlora.checkpoint import read_adapter
from mixlora.model import save_mixlora, set_adapter_weights


class MixLoraTrainer(Trainer):
    """`transformers.Trainer` that saves and resumes MixLoRA adapters in the published format.

    `Trainer._save` calls `model.save_pretrained`, which writes the full base model; here every save (`save_model`
    and the `save_steps` checkpoints) writes `adapter_config.json` + `adapter_model.bin` via `save_mixlora`, plus
    the tokenizer and training args as Trainer does. `resume_from_checkpoint` loads the adapter weights back.
    Reload a saved directory with `MixLoraModelForCausalLM.from_pretrained(dir)`.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_mixlora(self.accelerator.unwrap_model(self.model), output_dir, safe_serialization=False)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        set_adapter_weights(model if model is not None else self.model, read_adapter(resume_from_checkpoint)[1])
