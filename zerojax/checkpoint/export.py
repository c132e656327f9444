"""Hugging Face folders from checkpoints: `export_checkpoint` (a saved step, from the folder alone, as
DeepSpeed's `zero_to_fp32.py`) and `save_model` (the live state, as `stage3_gather_16bit_weights_on_model_save`)."""

from __future__ import annotations

import os

from zerojax._folders import refuse_overlap
from zerojax.checkpoint.errors import CheckpointError, CheckpointWriteError
from zerojax.checkpoint.manager import CheckpointManager
from zerojax.hf import export_hf
from zerojax.plan import TrainState


def export_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | str = "latest",
                      dtype: str = "fp32", max_shard_size: int | str = "5GB", overwrite: bool = False,
                      progress: bool = True):
    """Writes a checkpoint step as a Hugging Face folder (`config.json` + safetensors), one tensor in
    memory at a time, from the checkpoint folder alone (the model's `hf_config` is in its metadata);
    needs no mesh and no accelerator. Returns the folder's path. An `out_dir` that is, is inside or contains
    `ckpt_dir` is refused (`CheckpointError`) before anything is read or written."""
    refuse_overlap("export", out_dir, [ckpt_dir], CheckpointError)
    manager = CheckpointManager(ckpt_dir, read_only=True)
    step = manager.verify(step)  # nothing of the step is read before its files check out
    hf_config = manager.metadata(step)["hf_config"]
    if not hf_config:
        raise CheckpointError(
            f"step {step} in {manager.directory} has no hf_config in its metadata, so the Hugging Face model "
            "is unknown; save with CheckpointManager.save(..., hf_config=<the model's config dict>)."
        )
    try:
        return export_hf(manager.lazy_weights(step), hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                         overwrite=overwrite, progress=progress)
    except FileExistsError:
        raise
    except OSError as e:  # the partial folder is already removed; the checkpoint is untouched
        raise CheckpointWriteError(f"cannot export step {step}: {e}") from e


def save_model(state: TrainState, hf_config: dict, out_dir: str | os.PathLike, *, dtype: str = "bf16",
               max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True):
    """DeepSpeed's `stage3_gather_16bit_weights_on_model_save`: the live state's weights (the fp32 master
    when there is one) gathered tensor by tensor into a consolidated Hugging Face folder in `dtype`."""
    return export_hf(state.weights, hf_config, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                     overwrite=overwrite, progress=progress)
