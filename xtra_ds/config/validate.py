"""Checks of a loaded config that need no world size (:func:`validate`), and the ZeRO++ settings against the
world a run starts in (:func:`check_zero_plus_plus`); :func:`.derive.batch_plan` checks the batch split."""

from __future__ import annotations

import difflib

from ..models.attention import attention_names
from ..models.xtra import model_sizes, parse_model_name
from .schema import Config, ConfigError


def choice(key: str, value: str, choices) -> None:
    """``value`` must be one of ``choices``; the error names the key and the closest choice."""
    choices = tuple(choices)
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}"
                          + (f"; did you mean {hint[0]!r}?" if hint else ""))


def validate(cfg: Config) -> None:
    model = cfg.model
    try:
        _, patch = parse_model_name(model.name)
    except ValueError as e:
        raise ConfigError(f"model.name: {e}") from None
    img = model.img_size or model_sizes(model.name).img_size
    block_px = patch * model.block_size
    if model.block_size < 1 or img % block_px:
        below = max(block_px, img // block_px * block_px)
        ok = [below, below + block_px, below + 2 * block_px]  # the nearest whole-block sizes
        raise ConfigError(
            f"model.img_size={img} is not divisible by patch_size × block_size = {patch} × {model.block_size} = "
            f"{block_px}: the image must split into whole blocks. Use model.img_size in {ok} or another "
            f"model.block_size.")
    num_blocks = (img // block_px) ** 2
    if num_blocks < 2:
        raise ConfigError(f"model: {img}px with {block_px}px blocks gives one block; the objective needs at least 2 "
                          f"(lower model.block_size or raise model.img_size)")
    if not 0.0 <= model.drop_path < 1.0:
        raise ConfigError(f"model.drop_path={model.drop_path}: expected a probability in [0, 1)")
    choice("model.attention", model.attention, attention_names())
    objective = cfg.objective
    choice("objective.loss", objective.loss, ("mse", "l1"))
    choice("objective.block_order", objective.block_order, ("raster", "random"))
    if not 1 <= objective.heads_ahead < num_blocks:
        raise ConfigError(f"objective.heads_ahead={objective.heads_ahead}: expected 1 ≤ n < number of blocks "
                          f"({num_blocks})")
    choice("deepspeed.precision", cfg.deepspeed.precision, ("bf16", "bf16-mixed", "fp16", "fp32"))
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage}: expected 0, 1, 2 or 3")
    zpp = cfg.deepspeed
    if zpp.zero_hpz_partition_size < 1:
        raise ConfigError(f"deepspeed.zero_hpz_partition_size={zpp.zero_hpz_partition_size}: expected ≥ 1 (1 = off)")
    for key, on in (("zero_hpz_partition_size", zpp.zero_hpz_partition_size > 1),
                    ("zero_quantized_weights", zpp.zero_quantized_weights),
                    ("zero_quantized_gradients", zpp.zero_quantized_gradients)):
        if on and zpp.zero_stage != 3:
            raise ConfigError(f"deepspeed.{key} is a ZeRO++ option of ZeRO-3; deepspeed.zero_stage="
                              f"{zpp.zero_stage} would ignore it silently. Set deepspeed.zero_stage=3 or remove it.")
    optim = cfg.optim
    if optim.micro_batch_size < 1 or optim.global_batch_size < 1:
        raise ConfigError("optim.micro_batch_size and optim.global_batch_size must be ≥ 1")
    choice("data.on_order_change", cfg.data.on_order_change, ("refuse", "next_epoch"))
    streams = cfg.data.streams
    if streams < 0 or (streams and optim.global_batch_size % streams):
        raise ConfigError(f"data.streams={streams} must divide optim.global_batch_size={optim.global_batch_size} "
                          f"(0 = one stream per image of the global batch)")
    for key, pair in (("data.crop_scale", cfg.data.crop_scale), ("data.crop_ratio", cfg.data.crop_ratio),
                      ("optim.betas", optim.betas)):
        if len(pair) != 2 or not all(isinstance(v, (int, float)) for v in pair) or pair[0] > pair[1]:
            raise ConfigError(f"{key}={pair!r}: expected two numbers [low, high]")
    if cfg.data.samples_per_epoch < 0:
        raise ConfigError(f"data.samples_per_epoch={cfg.data.samples_per_epoch}: expected ≥ 0 (0 = from the data)")
    schedule = cfg.schedule
    if schedule.total_steps <= 0 and schedule.epochs <= 0:
        raise ConfigError("schedule: set schedule.epochs or schedule.total_steps to a positive value")
    resume = cfg.checkpoint.resume
    choice("checkpoint.resume", resume if resume in ("auto", "none") else "path", ("auto", "none", "path"))
    ev = cfg.eval
    for probe in ev.probes:
        choice("eval.probes", probe, ("linear", "attentive"))
    if not ev.lrs or not all(isinstance(v, (int, float)) and v > 0 for v in ev.lrs):
        raise ConfigError(f"eval.lrs={ev.lrs!r}: expected a list of positive learning rates")
    if ev.epochs < 1 or ev.batch_size < 2 or ev.feature_batch_size < 1 or ev.attentive_layers < 1:
        raise ConfigError("eval.epochs, eval.feature_batch_size and eval.attentive_layers must be ≥ 1 and "
                          "eval.batch_size ≥ 2 (BatchNorm needs two samples)")
    if ev.storage_retries < 1:
        raise ConfigError(f"eval.storage_retries={ev.storage_retries}: expected ≥ 1")
    if ev.device != "auto" and not (ev.device == "cpu" or ev.device.startswith("cuda")):
        raise ConfigError(f"eval.device={ev.device!r}: expected auto, cpu, cuda or cuda:N")


def check_zero_plus_plus(ds, world_size: int, ranks_per_node: int, accelerator: str) -> None:
    """The ZeRO++ options against the world they start in (called before any process group exists)."""
    h = ds.zero_hpz_partition_size
    if h > 1:
        if world_size % h or ranks_per_node % h:
            fits = [d for d in range(2, ranks_per_node + 1) if ranks_per_node % d == 0 and world_size % d == 0]
            raise ConfigError(f"deepspeed.zero_hpz_partition_size={h}: hpZ groups are {h} consecutive ranks, which "
                              f"must divide the {ranks_per_node} ranks of a node (and the world of {world_size}) so "
                              f"that no group straddles two nodes; use one of {fits or [1]} (1 = off)")
    if accelerator != "cuda" and (ds.zero_quantized_weights or ds.zero_quantized_gradients):
        raise ConfigError("deepspeed.zero_quantized_weights / zero_quantized_gradients (ZeRO++ qwZ/qgZ) need "
                          f"DeepSpeed's CUDA quantizer kernels, which have no {accelerator} build; remove them "
                          "here (they are measured by bench/run_gpu.sh on a GPU)")
