"""Decoding and augmentation with PIL (workers), normalisation on the training device.

Workers emit ``uint8 [B, H, W, 3]`` batches: 4× fewer bytes to pin and copy than float32; the
device turns them into normalised ``float [B, 3, H, W]`` (:func:`normalize_on_device`).
"""

from __future__ import annotations

import functools
import io
import math
import random

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rrc_params(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (left, top, w, h), torchvision's algorithm (10 tries, then centre)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_train(data: bytes, size: int, scale, ratio, hflip: float, rng: random.Random,
                 draft: bool = True) -> np.ndarray:
    """Bytes -> RandomResizedCrop(size, bicubic) + flip -> ``uint8 [size, size, 3]``.

    With ``draft``, a JPEG whose crop is ≥ 2× the output size is decoded at 1/2, 1/4 or 1/8
    scale in the DCT domain (still ≥ the output size in the crop), then resized: several times
    faster, and the bicubic downscale that follows hides the difference.
    """
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    left, top, w, h = rrc_params(W, H, scale, ratio, rng)
    if draft and im.format == "JPEG" and min(w, h) >= 2 * size:
        req = (math.ceil(W * size / w), math.ceil(H * size / h))
        im.draft("RGB", req)
        sx, sy = im.size[0] / W, im.size[1] / H
        left, top, w, h = left * sx, top * sy, w * sx, h * sy
    if im.mode != "RGB":
        im = im.convert("RGB")
    im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h), reducing_gap=None)
    if rng.random() < hflip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def decode_eval(data: bytes, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resize the shorter side to ``size / crop_fraction`` then centre-crop ``size``: ``uint8 [size, size, 3]``."""
    im = Image.open(io.BytesIO(data))
    W, H = im.size
    short = size / crop_fraction
    if im.format == "JPEG" and min(W, H) >= 2 * short:
        im.draft("RGB", (math.ceil(W * short / min(W, H)), math.ceil(H * short / min(W, H))))
        W, H = im.size
    if im.mode != "RGB":
        im = im.convert("RGB")
    f = short / min(W, H)
    cw, ch = size / f, size / f
    left, top = (W - cw) / 2, (H - ch) / 2
    im = im.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch), reducing_gap=None)
    return np.asarray(im)


@functools.lru_cache(maxsize=None)
def _mean_std(device):
    """ImageNet mean and std as ``[1, 3, 1, 1]`` tensors on ``device``, made once (not per batch)."""
    import torch

    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize_on_device(images_BHWC, dtype=None):
    """``uint8 [B, H, W, 3]`` (any device) -> ImageNet-normalised ``[B, 3, H, W]`` in ``dtype``."""
    mean, std = _mean_std(images_BHWC.device)
    x = images_BHWC.permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
    return x.to(dtype) if dtype is not None else x
