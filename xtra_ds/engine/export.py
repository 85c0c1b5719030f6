"""Encoder exports for the eval worker and release, and ZeRO-3 checkpoint consolidation.

* :func:`full_fp32_state` gathers the fp32 master weights from a running engine (collective).
* :func:`write_export` publishes ``exports/step_XXXXXXXX/{encoder.safetensors, meta.json}``
  atomically: written under a temporary name, then the folder is renamed.
* :func:`consolidate` turns a ZeRO checkpoint into one fp32 safetensors file, one tensor at a
  time from memory-mapped partitions, so its peak memory stays near the largest tensor rather
  than the whole model (``launchers/consolidate.py`` is the command).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Iterable

import torch

from ..interop import encoder_from_any
from .checkpoint import tag_of


def full_fp32_state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every parameter (starting with ``prefix``) as a full fp32 CPU tensor. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        if not name.startswith(prefix):
            continue
        full = safe_get_full_fp32_param(p)  # None when DeepSpeed holds no fp32 master copy of p
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def write_export(run_dir: str | Path, step: int, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Publish an encoder export for ``step``; returns its folder. Rank 0 only."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "exports"
    final = root / tag_of(step)
    tmp = root / f".{tag_of(step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    enc = {k: v.contiguous() for k, v in encoder_from_any(state).items()}
    save_file(enc, str(tmp / "encoder.safetensors"), metadata={"step": str(step), "layout": "timm-vit"})
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "time": time.time()}, indent=1))
    if final.exists():  # a re-export of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# --- consolidation ------------------------------------------------------------------------------

def stream_safetensors(path: str | Path, items: Iterable[tuple[str, tuple, callable]], metadata: dict | None = None) -> int:
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
    os.replace(tmp, path)
    return 8 + len(head) + offset


def consolidate(checkpoint: str | Path, output: str | Path, encoder_only: bool = False) -> int:
    """A ZeRO (1–3) checkpoint folder (``…/checkpoints/step_00001000``) -> one fp32 safetensors file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint folder")
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
    names = [k for k in lazy if not encoder_only or k.startswith("enc.")]

    items = [(k[len("enc."):] if encoder_only else k, tuple(lazy[k].shape), (lambda k=k: lazy[k].contiguous()))
             for k in names]
    return stream_safetensors(output, items, {"source": str(ckpt), "layout": "timm-vit" if encoder_only else "xtra"})
