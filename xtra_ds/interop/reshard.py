"""A ZeRO-3 checkpoint re-partitioned for another data-parallel world size, one new rank at a time.

DeepSpeed 0.19 refuses to load a ZeRO-3 checkpoint on another world size
(``ZeRORuntimeException: … used a DP world size of 2 but the current world size is 1``), after it
has already applied part of it. Its universal-checkpoint path does load stage 3, but in the pinned
version it gives every parameter group the hyperparameters of the first (our no-decay group would
decay) and shares one ``step`` tensor between sub-groups (Adam's bias correction runs ahead after
the first step); ``tests/test_elastic.py`` checks both, so a DeepSpeed that fixes them is noticed.

So the re-partitioning is ours, and small: in a stage-3 optimizer file each parameter holds
``ceil(numel / W)`` elements of its sub-group's flat fp32 partition and of each Adam moment, in
the order of the model-states file's ``param_shapes``. :func:`reshard_rank` writes the files new
rank ``r`` of ``W'`` loads — its slice of every parameter, read straight from the old ranks'
memory-mapped partitions (never a whole model in memory: each rank holds only what it will train
with), sub-groups recomputed for ``W'`` with DeepSpeed's own rule, everything else (step, param
groups, loss scaler, client state) carried over — so that DeepSpeed's regular loader restores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..storage import publish_local
from .zero import MOMENTS, CheckpointFileError, ZeroCheckpoint

DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


@dataclass(frozen=True)
class _Param:
    name: str
    shape: torch.Size
    sub_group: int  # in the saved checkpoint
    offset: int  # in that sub-group's flat partition

    @property
    def numel(self) -> int:
        return self.shape.numel()


def _groups(ckpt: ZeroCheckpoint) -> list[list[_Param]]:
    """Every optimizer parameter group's parameters in order, located in the saved partitions."""
    return [[_Param(*p) for p in group["params"]] for group in ckpt.optimizer_groups()]


def sub_groups(params: list[_Param], world: int, sub_group_size: int | None) -> list[list[_Param]]:
    """DeepSpeed's split of one parameter group into sub-groups (``_create_fp16_sub_groups``): close a
    sub-group once its partition reaches ``sub_group_size`` elements — so 0 closes one after every
    parameter; only ``None`` or a size of at least the whole group's partition keeps one sub-group."""
    sizes = [math.ceil(p.numel / world) for p in params]
    if sub_group_size is None or sub_group_size >= sum(sizes):
        return [params]
    out, current, n = [], [], 0
    for p, size in zip(params, sizes, strict=True):
        current.append(p)
        n += size
        if n >= sub_group_size or p is params[-1]:
            out.append(current)
            current, n = [], 0
    return out


def _slice(ckpt: ZeroCheckpoint, p: _Param, lo: int, hi: int, key: str) -> torch.Tensor:
    """Elements ``[lo, hi)`` of parameter ``p``'s flattened ``key`` (fp32 or a moment), from the old ranks."""
    part = math.ceil(p.numel / ckpt.world_size)
    pieces = []
    for rank in range(lo // part, (hi - 1) // part + 1):
        state = ckpt.optim(rank)
        flat = state["fp32_flat_groups"][p.sub_group] if key == "fp32" else \
            state["optimizer_state_dict"]["state"][p.sub_group][key]
        a, b = max(lo, rank * part) - rank * part, min(hi, (rank + 1) * part) - rank * part
        pieces.append(flat[p.offset + a:p.offset + b])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def reshard_rank(ckpt: ZeroCheckpoint, world: int, rank: int, out: str | Path,
                 sub_group_size: int = DEFAULT_SUB_GROUP_SIZE) -> list[Path]:
    """Write the model-states and optimizer-states files of rank ``rank`` of ``world`` into ``out``
    (DeepSpeed's names); returns them. Every rank of the new world calls it for itself."""
    if ckpt.zero_stage != 3:
        raise CheckpointFileError(f"{ckpt.folder}: ZeRO stage {ckpt.zero_stage}; only stage-3 checkpoints are "
                                  f"re-partitioned here (stages 1–2: DeepSpeed's elastic_checkpoint)")
    if ckpt.meta.get("frozen_param_fragments"):
        raise CheckpointFileError(f"{ckpt.folder}: frozen parameters are not re-partitioned")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = ckpt.optim_file(0)
    inner = saved["optimizer_state_dict"]["optimizer_state_dict"]
    state, param_groups, flats, shapes = {}, [], [], []
    for g, params in enumerate(_groups(ckpt)):
        first_sub = inner["param_groups"][g]["params"][0]
        step = inner["state"][first_sub]["step"]
        indices = []
        for members in sub_groups(params, world, sub_group_size):
            numel = sum(math.ceil(p.numel / world) for p in members)
            new = {key: torch.empty(numel, dtype=torch.float32) for key in ("fp32", *MOMENTS)}
            at = 0
            for p in members:
                part = math.ceil(p.numel / world)
                lo, hi = min(rank * part, p.numel), min((rank + 1) * part, p.numel)
                for key, flat in new.items():
                    if lo < hi:  # a rank past the end of a small parameter holds padding only
                        flat[at:at + hi - lo] = _slice(ckpt, p, lo, hi, key)
                    flat[at + hi - lo:at + part] = 0  # padding: zeros, as DeepSpeed writes it
                at += part
            indices.append(len(flats))
            state[len(flats)] = {"step": step.clone(), **{key: new[key] for key in MOMENTS}}
            flats.append(new["fp32"])
            shapes.append({p.name: p.shape for p in members})
        param_groups.append({**inner["param_groups"][g], "params": indices})
    optim = {**saved["optimizer_state_dict"], "partition_count": world, "fp32_flat_groups": flats,
             "optimizer_state_dict": {"state": state, "param_groups": param_groups}}
    prefix = "bf16_" if ckpt.bf16 else ""
    files = [out / f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
             out / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"]
    _save({**saved, "optimizer_state_dict": optim}, files[0])
    _save({**ckpt.meta, "dp_world_size": world, "param_shapes": shapes}, files[1])
    return files


def _save(obj, path: Path) -> None:
    """``torch.save`` without the zip's CRC-32 where torch allows it (≥ 2.7: half of the writing time here; the
    loaders do not check it); a plain ``torch.save`` on older releases."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.7
        torch.save(obj, tmp)
    else:
        crc, config.save.compute_crc32 = config.save.compute_crc32, False
        try:
            torch.save(obj, tmp)
        finally:
            config.save.compute_crc32 = crc
    publish_local(tmp, path)
