"""Will the model states fit? An estimate per rank, made before anything is built, and the check.

Per parameter, a rank holds (ZeRO partitions divide a part by the world size W):

| part | bf16 | bf16-mixed, fp32 | partitioned from stage |
|---|---|---|---|
| weights (what forward uses) | 2 | 4 | 3 |
| gradients (reduced, and the fp32 copy the optimizer steps on) | 2 + 4 | 4 + 4 | 2 |
| fp32 master weights (the optimizer's partition) | 4 | 4 | 1 |
| Adam moments | 8 | 8 | 1 |

20 and 24 bytes per parameter at stage 3 and W = 1, where resident memory measured 20.2 and 27.7
(B/16, CPU; ``bench/bench_memory.py``, docs/PERFORMANCE.md) — the rest of fp32's is the buckets,
counted apart: the working set of ZeRO-3 (parameters gathered for the layer in hand and the
prefetch bucket, the gradient reduction bucket) and the runtime itself. Activations are not
counted: they depend on the micro batch and are bounded by activation checkpointing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from ..config.schema import Config, ConfigError
from ..models.xtra import XTRA, XTRASizes

log = logging.getLogger("xtra_ds.train")
GiB = 2**30
RUNTIME_BYTES = 0.5 * GiB  # Python, torch, DeepSpeed imported, the process group joined (measured 0.25 GiB, CPU)


@dataclass(frozen=True)
class Estimate:
    model_states: float  # bytes per rank: weights, gradients, master weights, Adam moments
    working: float  # bytes per rank: gathered parameters, communication buckets, the runtime

    @property
    def total(self) -> float:
        return self.model_states + self.working


def parameter_numels(sizes: XTRASizes) -> tuple[int, ...]:
    """Every trainable parameter's element count of the model of ``sizes``, built on the meta device (nothing
    allocated; the attention kernel, drop path and checkpointing add no parameters)."""
    with torch.device("meta"):
        model = XTRA(sizes)
    return tuple(p.numel() for p in model.parameters() if p.requires_grad)


def bytes_per_parameter(precision: str, stage: int, world_size: int) -> float:
    """Model-state bytes per parameter on one rank (the table above)."""
    low = precision == "bf16" or precision == "fp16"
    weights, grads, master, moments = (2, 2 + 4, 4, 8) if low else (4, 4 + 4, 4, 8)
    w = world_size
    return (weights / (w if stage >= 3 else 1) + grads / (w if stage >= 2 else 1)
            + (master + moments) / (w if stage >= 1 else 1))


def estimate(cfg: Config, plan, num_params: int) -> Estimate:
    """The per-rank memory of ``cfg``'s model states on ``plan.batch.world_size`` ranks."""
    ds = cfg.deepspeed
    elem = 2 if ds.precision in ("bf16", "fp16") else 4
    states = bytes_per_parameter(ds.precision, ds.zero_stage, plan.batch.world_size) * num_params
    gathered = min(num_params, ds.prefetch_bucket_size) * elem if ds.zero_stage >= 3 else 0
    working = gathered + ds.reduce_bucket_size * (elem + 4) + RUNTIME_BYTES  # the bucket in compute + fp32
    return Estimate(states, working)


def process_rss() -> int:
    """This process's resident memory in bytes (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def device_memory(device: torch.device) -> tuple[float, str]:
    """(bytes one rank may use, what that is): the GPU's memory, or on a CPU the host's available
    memory shared by the ranks of this node."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return float(total), f"{torch.cuda.get_device_name(device)} memory"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available / local, f"the host's available memory / {local} rank(s) on this node"


def advice(cfg: Config, plan, num_params: int, have: float) -> list[str]:
    """Changes that make ``cfg`` need less memory per rank, each one the builder accepts and the estimate counts,
    as ``key=value`` overrides (or a sentence, for more ranks or another model); most effective first."""
    from dataclasses import replace

    ds, w = cfg.deepspeed, plan.batch.world_size
    now = estimate(cfg, plan, num_params).total
    out = []
    fits = [n for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n > w and
            estimate(cfg, _with_world(plan, n), num_params).total <= have]
    if ds.zero_stage == 3 and fits:
        out.append(f"more ranks (ZeRO-3 divides the model states by them: {fits[0]} would fit)")
    for stage in range(ds.zero_stage + 1, 4):  # partitioning more of the states
        staged = replace(cfg, deepspeed=replace(ds, zero_stage=stage))
        more = next((n for n in (w, *fits, 1024) if n >= w and
                     estimate(staged, _with_world(plan, n), num_params).total <= have), None)
        if more is not None:
            out.append(f"deepspeed.zero_stage={stage}" + (f" on {more} ranks" if more != w else ""))
            break
    if ds.precision not in ("bf16", "fp16"):
        lower = replace(cfg, deepspeed=replace(ds, precision="bf16"))
        if estimate(lower, plan, num_params).total < now:
            out.append("deepspeed.precision=bf16 (bf16 weights and gradients, fp32 master weights)")
    small = {"prefetch_bucket_size": ds.prefetch_bucket_size // 4, "reduce_bucket_size": ds.reduce_bucket_size // 4}
    buckets = replace(cfg, deepspeed=replace(ds, **small))
    saved = now - estimate(buckets, plan, num_params).total
    if saved > 0.05 * now:
        out.append(" ".join(f"deepspeed.{k}={v}" for k, v in small.items()) + f" (−{saved / GiB:.1f} GiB)")
    out.append("a smaller model.name")
    return out


def check_fits(cfg: Config, plan, num_params: int, device: torch.device) -> Estimate:
    """Refuse to build what cannot fit (the numbers and the fixes); warn when within 10%."""
    est = estimate(cfg, plan, num_params)
    have, what = device_memory(device)
    ds, w = cfg.deepspeed, plan.batch.world_size
    summary = (f"{cfg.model.name} ({num_params / 1e6:.0f}M parameters, {ds.precision}, ZeRO-{ds.zero_stage}, {w} "
               f"rank(s)) needs ≈{est.total / GiB:.1f} GiB per rank before activations "
               f"({est.model_states / GiB:.1f} GiB of model states at "
               f"{bytes_per_parameter(ds.precision, ds.zero_stage, w):.1f} bytes/parameter + "
               f"{est.working / GiB:.1f} GiB gathered parameters, buckets and runtime); {what}: {have / GiB:.1f} GiB")
    if est.total > have:
        raise ConfigError(f"{summary}: it does not fit. Use " + "; or ".join(advice(cfg, plan, num_params, have)))
    if est.total > 0.9 * have:
        log.warning("%s: within 10%% of the limit; activations may not fit", summary)
    else:
        log.info("memory: %s", summary)
    return est


def _with_world(plan, world: int):
    from dataclasses import replace

    return replace(plan, batch=replace(plan.batch, world_size=world))
