"""ZeRO checkpoints -> one fp32 safetensors file, one tensor at a time.

:func:`consolidate` reads the per-rank partitions memory-mapped (DeepSpeed's ``zero_to_fp32`` in
lazy mode) and :func:`stream_safetensors` writes each tensor as soon as it is assembled, so peak
memory stays near the largest tensor rather than the whole model (``launchers/consolidate.py``).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch


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
