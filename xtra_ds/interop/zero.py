"""DeepSpeed ZeRO checkpoints, read safely and one tensor at a time.

:class:`ZeroCheckpoint` reads a checkpoint folder (one tag) the way DeepSpeed lays it out — for
ZeRO-3, per rank ``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` (the parameter shapes, 0-element
placeholders) and ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` (the rank's fp32 master
partition and Adam moments, one flat tensor per sub-group; each parameter holds ceil(numel / W)
elements of it, padded, in the order of ``param_shapes``) — with ``torch.load(weights_only=True)``
and memory-mapped files: nothing but tensors, plain data and DeepSpeed's two optimizer-state classes
is unpickled, and a full tensor exists only while it is used.

:func:`consolidate` writes every parameter's fp32 master copy to one safetensors file
(:func:`stream_safetensors`: one tensor in memory at a time; ``launchers/consolidate.py``).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..compat import check_torch
from ..storage import publish_local

check_torch()  # safe_load needs torch.serialization.safe_globals: say so before a checkpoint is half read

MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be read safely (missing, truncated, or holding more than tensors)."""


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its optimizer states: the only non-plain objects allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


def safe_load(path: str | Path, mmap: bool = True):
    """``torch.load`` that unpickles only tensors, plain data and :func:`_deepspeed_globals`."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: missing") from None
    except Exception as e:  # UnpicklingError for foreign objects, RuntimeError for truncated zips
        raise CheckpointFileError(f"{path}: cannot be read safely ({type(e).__name__}: {str(e)[:300]}). Only files "
                                  f"written by DeepSpeed for this project are read; anything that needs more "
                                  f"than tensors and plain data to unpickle is refused") from None


def _rank_of(path: Path) -> int:
    return int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))


class ZeroCheckpoint:
    """One DeepSpeed checkpoint folder (``…/checkpoints/step_00001000``), any ZeRO stage."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such checkpoint folder")
        self.model_files = sorted(self.folder.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"), key=_rank_of)
        self.optim_files = sorted(self.folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
        plain = self.folder / "mp_rank_00_model_states.pt"
        first = self.model_files[0] if self.model_files else plain
        if not first.is_file():
            raise FileNotFoundError(f"{self.folder}: no DeepSpeed model states in it (not a checkpoint folder?)")
        self.meta = safe_load(first)  # shapes, steps, world size; placeholders only for ZeRO-3
        self.world_size = int(self.meta.get("dp_world_size", 1))
        self._optim: dict[int, dict] = {}
        self.zero_stage = int(self.optim(0)["zero_stage"]) if self.optim_files else 0
        if self.optim_files and len(self.optim_files) != self.world_size:
            raise CheckpointFileError(f"{self.folder}: {len(self.optim_files)} optimizer-state files for a world of "
                                      f"{self.world_size} ranks (an incomplete copy?)")

    @property
    def bf16(self) -> bool:
        return bool(self.optim_files) and self.optim_files[0].name.startswith("bf16_")

    def optim_file(self, rank: int) -> dict:
        """Rank ``rank``'s whole optimizer-states file, memory-mapped."""
        if rank not in self._optim:
            self._optim[rank] = safe_load(self.optim_files[rank])
        return self._optim[rank]

    def optim(self, rank: int) -> dict:
        """Rank ``rank``'s optimizer state (``optimizer_state_dict`` of its file), memory-mapped."""
        return self.optim_file(rank)["optimizer_state_dict"]

    def verify(self) -> None:
        """Every file of the folder loads safely (raises CheckpointFileError naming the first that does not)."""
        for f in sorted(self.folder.glob("*.pt")):
            safe_load(f)

    # --- ZeRO-3: where each parameter's elements live -------------------------------------------
    def layout(self) -> Iterator[tuple[str, torch.Size, int, int]]:
        """(name, shape, sub-group, offset in the sub-group's flat partition) of every parameter (ZeRO-3)."""
        if self.zero_stage != 3:
            raise ValueError(f"{self.folder}: ZeRO stage {self.zero_stage}, not 3")
        for group, shapes in enumerate(self.meta["param_shapes"]):
            offset = 0
            for name, shape in shapes.items():
                yield name, torch.Size(shape), group, offset
                offset += math.ceil(torch.Size(shape).numel() / self.world_size)

    def optimizer_groups(self) -> list[dict]:
        """The optimizer's parameter groups as saved (ZeRO-3), in order: each with its ``settings`` as the
        client optimizer had them (``lr``, ``betas``, ``eps``, ``weight_decay``, …), the Adam ``step`` count of
        each of its sub-groups (``steps``) and its ``params``: (name, shape, sub-group, offset) in order."""
        located: dict[int, list] = {}
        for name, shape, sub, offset in self.layout():
            located.setdefault(sub, []).append((name, shape, sub, offset))
        inner = self.optim(0)["optimizer_state_dict"]
        return [{"settings": {k: v for k, v in group.items() if k != "params"},
                 "steps": [float(inner["state"][sub]["step"]) for sub in group["params"]],
                 "params": [p for sub in group["params"] for p in located[sub]]}
                for group in inner["param_groups"]]

    def full(self, group: int, offset: int, shape: torch.Size, key: str = "fp32") -> torch.Tensor:
        """One parameter's ``key`` (``fp32`` master weights, ``exp_avg`` or ``exp_avg_sq``) gathered
        from every rank's partition (ZeRO-3)."""
        n = shape.numel()
        part = math.ceil(n / self.world_size)
        pieces = []
        for rank in range(self.world_size):
            state = self.optim(rank)
            flat = state["fp32_flat_groups"][group] if key == "fp32" else \
                state["optimizer_state_dict"]["state"][group][key]
            pieces.append(flat[offset:offset + part])
        return torch.cat(pieces)[:n].view(shape)

    def fp32_tensors(self) -> Iterator[tuple[str, tuple, callable]]:
        """(name, shape, make) of every parameter's fp32 master weights; ``make()`` assembles it when called."""
        if self.zero_stage == 3:
            for name, shape, group, offset in self.layout():
                yield name, tuple(shape), (lambda g=group, o=offset, s=shape: self.full(g, o, s))
        elif self.zero_stage == 0:
            for name, t in self.meta["module"].items():
                yield name, tuple(t.shape), (lambda t=t: t.float())
        else:  # ZeRO-1/2 flatten differently (alignment padding): DeepSpeed's reader, once every file is safe
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            self.verify()
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(self.folder.parent), tag=self.folder.name,
                                                            lazy_mode=True)
            for name in lazy:
                yield name, tuple(lazy[name].shape), (lambda k=name: lazy[k].contiguous())


def stream_safetensors(path: str | Path, items: Iterable[tuple[str, tuple, callable]],
                       metadata: dict | None = None) -> int:
    """Write fp32 tensors to a safetensors file one at a time.

    ``items``: (name, shape, make) with ``make()`` returning the tensor only when it is written,
    so at most one tensor is in memory. Returns the bytes written.
    """
    items = list(items)
    header, offset = {}, 0
    for name, shape, _ in items:
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name, shape, make in items:
            t = make().detach().to(torch.float32).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(shape)}")
            f.write(memoryview(t.numpy()).cast("B"))  # no bytes copy of the tensor
            del t
    publish_local(tmp, path)
    return 8 + len(head) + offset


def consolidate(checkpoint: str | Path, output: str | Path, encoder_only: bool = False) -> int:
    """A ZeRO checkpoint folder (``…/checkpoints/step_00001000``) -> one fp32 safetensors file; returns its bytes.
    ``encoder_only``: the encoder alone, in timm's ViT layout."""
    ckpt = ZeroCheckpoint(checkpoint)
    items = [(name[len("enc."):] if encoder_only else name, shape, make) for name, shape, make in ckpt.fp32_tensors()
             if not encoder_only or name.startswith("enc.")]
    return stream_safetensors(output, items, {"source": str(checkpoint),
                                              "layout": "timm-vit" if encoder_only else "xtra"})
