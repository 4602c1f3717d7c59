"""Saving where the weights are sharded (FSDP, DeepSpeed ZeRO-3): gathered, written once.

    with whole_adapter_saves(trainer): trainer.save_model(...)     # FSDP: one whole adapter file
    state_dict = gathered_state_dict(trainer)                      # FSDP / ZeRO-3: on every rank
"""

from __future__ import annotations

from contextlib import contextmanager


def zero3(trainer) -> bool:
    return trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_config["zero_optimization"].get("stage") == 3


def sharded_checkpoints_only(trainer) -> bool:
    """FSDP with `fsdp_state_dict_type: SHARDED_STATE_DICT` (fsdp_qlora.yaml): transformers' save_model
    writes no weights (save_fsdp_model writes the adapter's shards into each checkpoint, for resuming)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    return plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type)


def gathered_state_dict(trainer) -> dict | None:
    """The model's weights gathered from their shards onto the main process, for
    `save_pretrained(state_dict=...)`, under FSDP and ZeRO-3; None where every rank holds whole weights
    (one process, DDP, ZeRO-1/2). When sharded this is a collective: every rank must call it."""
    if zero3(trainer):
        # Trainable weights only (the adapter: not the frozen base, nor the DPO reference), 16-bit, as
        # transformers saves PEFT models under ZeRO-3 (needs stage3_gather_16bit_weights_on_model_save).
        return trainer.deepspeed._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)  # FULL_STATE_DICT, on rank 0 (CPU)
    return None


@contextmanager
def whole_adapter_saves(trainer):
    """FSDP: inside, `trainer.save_model` gathers the shards (on every rank) and the main process writes
    one whole adapter file. Without it a SHARDED_STATE_DICT run's final adapter folder held no weights."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is None or not sharded_checkpoints_only(trainer):
        yield
        return
    before = plugin.state_dict_type
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.set_state_dict_type(before)
