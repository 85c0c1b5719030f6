"""Checkpoint formats, in one place: official XTRA checkpoints in and timm-layout encoders out
(:mod:`.official`), ZeRO checkpoints consolidated into one safetensors file (:mod:`.zero`) or
re-partitioned for another world size (:mod:`.reshard`), and
the ``xtra-convert`` command (:mod:`.cli`)."""

from .cli import main
from .official import (
    CheckpointError,
    encoder_from_any,
    encoder_to_timm,
    export_encoder,
    load_official,
    load_state_dict_checked,
    read_checkpoint,
    timm_attention_mask,
)
from .reshard import reshard_rank
from .zero import ZeroCheckpoint, consolidate, stream_safetensors

__all__ = ["CheckpointError", "read_checkpoint", "load_state_dict_checked", "load_official", "encoder_to_timm",
           "encoder_from_any", "export_encoder", "timm_attention_mask", "consolidate", "stream_safetensors",
           "ZeroCheckpoint", "reshard_rank", "main"]
