"""Derive the dict that ``deepspeed.initialize`` takes from the config tree."""

from __future__ import annotations

from ..models.layers import Block
from .derive import BatchPlan
from .schema import Config, ConfigError

# The module ZeRO-3 gathers as one unit when deepspeed.zero3_leaf_blocks is on: the transformer block of the encoder
# and the predictor (every parameter of the model but the embeddings, the projection and the pixel head)
LEAF_BLOCK_CLASS = f"{Block.__module__}.{Block.__qualname__}"


def deepspeed_dict(cfg: Config, batch: BatchPlan) -> dict:
    """The DeepSpeed config for ``batch`` (the run's batch plan). Batch sizes, precision, clipping
    and ZeRO come from the tree; ``deepspeed.extra`` is merged last, and may not contradict the batch."""
    ds = cfg.deepspeed
    out: dict = {
        # DeepSpeed wants micro × accum × world; with uneven rank shares that is more than the images each
        # step really holds (batch.global_batch), which only DeepSpeed's own sample counter sees
        "train_batch_size": batch.micro_batch * batch.accum * batch.world_size,
        "train_micro_batch_size_per_gpu": batch.micro_batch,
        "gradient_accumulation_steps": batch.accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": ds.contiguous_gradients,
            "reduce_bucket_size": ds.reduce_bucket_size,
        },
    }
    if ds.zero_stage == 3:
        out["zero_optimization"].update({
            "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
            "stage3_param_persistence_threshold": ds.param_persistence_threshold,
            "stage3_max_live_parameters": ds.max_live_parameters,
            # exports are gathered by our own code; no 16-bit copy on every save
            "stage3_gather_16bit_weights_on_model_save": False,
            "zero_hpz_partition_size": ds.zero_hpz_partition_size,
            "zero_quantized_weights": ds.zero_quantized_weights,
            "zero_quantized_gradients": ds.zero_quantized_gradients,
        })
        if ds.zero3_leaf_blocks:
            # one all-gather, one release and one pair of module hooks per block instead of one per Linear and
            # LayerNorm in it; deepspeed.initialize flags the blocks before it sets the ZeRO-3 hooks
            out["zero_optimization"]["leaf_module"] = {"classes": [LEAF_BLOCK_CLASS]}
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "bf16-mixed":  # the reference's Lightning bf16-mixed: autocast over fp32 weights
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 16}
    for key, value in ds.extra.items():
        if key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps") \
                and value != out[key]:
            raise ConfigError(f"deepspeed.extra.{key}={value} contradicts the batch derived from optim.* "
                              f"({key}={out[key]}); remove it from deepspeed.extra and set optim.* instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
