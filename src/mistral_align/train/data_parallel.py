"""Several processes train one model: the trainer's model must really be wrapped for data parallelism.

accelerate 1.15 marks a model as prepared when `Trainer.evaluate()` prepares it in evaluation mode
(no DistributedDataParallel wrapper), and its guard against double wrapping (accelerate PR #3977)
then makes the training `prepare()` hand the same unwrapped model back. Every stage evaluates
before training by default (`eval.loss_before`), so without this each rank trained alone: no
gradient all-reduce, a different adapter on every rank, and rank 0's saved as the result.
`WrapsForDataParallel` forgets the evaluation-mode preparation before training, and
`check_ranks_agree` is the check that catches any other route to the same divergence.
"""

from __future__ import annotations

import torch


class WrapsForDataParallel:
    """Trainer mixin: a model prepared only for evaluation is prepared again (DDP-wrapped) for training."""

    def train(self, *args, **kwargs):
        model, accelerator = self.model, self.accelerator
        if accelerator.num_processes > 1 and self.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
            model._is_accelerate_prepared = False
            accelerator._models[:] = [m for m in accelerator._models if m is not model]
        return super().train(*args, **kwargs)


def trainable_checksum(model: torch.nn.Module) -> float:
    """A float64 sum over every trainable value: equal on ranks that hold the same weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def check_ranks_agree(trainer) -> None:
    """After training with several processes, every rank must hold the same trainable weights."""
    accelerator = trainer.accelerator
    # Under FSDP or DeepSpeed each rank holds a shard, so checksums differ by design.
    if accelerator.num_processes <= 1 or accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        return
    mine = torch.tensor([trainable_checksum(accelerator.unwrap_model(trainer.model))], dtype=torch.float64,
                        device=accelerator.device)  # fmt: skip
    every = accelerator.gather(mine).tolist()
    if any(abs(x - every[0]) > 1e-9 * max(1.0, abs(every[0])) for x in every):
        raise RuntimeError(
            f"the {accelerator.num_processes} processes ended with different trainable weights "
            f"(checksums {every}): they did not train as one data-parallel model"
        )
