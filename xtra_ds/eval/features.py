"""Labelled evaluation sets (data_prep shards) and frozen-encoder features for the probes.

One encoder forward per image gives both probes' inputs:

* linear: the last block's output after the final LayerNorm, averaged over tokens ``[B, D]``;
* attentive: the mean of the last ``layers`` blocks' outputs, no final norm ``[B, N, D]``.

The decoded images of an evaluation set are kept in memory (``uint8``) so that successive
exports are probed without decoding the set again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..data.remote import ShardReadError
from ..data.transforms import normalize_on_device

log = logging.getLogger("xtra_ds.eval")


@dataclass
class LabelledSet:
    spec: str
    images: torch.Tensor  # [N, H, W, 3] uint8, resized + centre-cropped
    labels: torch.Tensor  # [N] int64
    classes: dict = field(default_factory=dict)  # name -> index, from the data_prep manifest

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return max(len(self.classes), int(self.labels.max()) + 1)


def read_classes(spec: str, storage_options: dict | None = None) -> dict:
    """The class map of a data_prep manifest (``{}`` for brace patterns or unlabelled sets)."""
    from ..data.shards import read_manifest

    return dict((read_manifest(spec, storage_options) or {}).get("classes") or {})


def load_labelled(spec: str, img_size: int, *, storage_options: dict | None = None, num_workers: int = 0,
                  batch_size: int = 256, max_samples: int = 0) -> LabelledSet:
    """Every sample of a labelled shard set, decoded for evaluation (resize + centre crop)."""
    from ..data.eval_loader import eval_batches
    from ..data.shards import resolve

    shards = resolve(spec, storage_options)
    if not shards:
        raise ValueError(f"{spec}: no shards")
    total = sum(s.num_samples for s in shards)
    stride = max(1, total // max_samples) if max_samples else 1  # evenly spaced: data_prep writes class by class
    images, labels, n = [], [], 0
    for b in eval_batches(shards, batch_size=batch_size, img_size=img_size, num_workers=num_workers,
                          storage_options=storage_options, stride=stride):
        images.append(b["images"]), labels.append(b["labels"])
        n += len(b["labels"])
        if max_samples and n >= max_samples:
            break
    if not images:
        raise ValueError(f"{spec}: no decodable images")
    x, y = torch.cat(images), torch.cat(labels)
    if max_samples:
        x, y = x[:max_samples], y[:max_samples]
    if (y < 0).any():
        raise ValueError(f"{spec}: {int((y < 0).sum())} samples carry no class label; probes need labelled "
                         f"shards (made by data_prep from class folders or a list with a 'label' column)")
    return LabelledSet(spec, x, y, read_classes(spec, storage_options))


def check_classes(train: str, train_classes: dict, val: str, val_classes: dict) -> None:
    """Both splits must number classes the same way (data_prep numbers the classes it sees)."""
    if train_classes and val_classes and train_classes != val_classes:
        only_t, only_v = set(train_classes) - set(val_classes), set(val_classes) - set(train_classes)
        raise ValueError(f"{train} and {val} number their classes differently"
                         + (f" (only in train: {sorted(only_t)[:5]}; only in val: {sorted(only_v)[:5]})"
                            if only_t or only_v else "")
                         + ": shard both splits with the same class folders")


class EvalDataError(RuntimeError):
    """The labelled eval data cannot serve (missing or unreadable shards, no labels, classes numbered
    differently): no export can be evaluated until someone fixes it, so the worker stops."""


class EvalSets:
    """A labelled dataset's train and val splits (``eval.train``, ``eval.val``), decoded once per image size and
    kept in memory; ``max_samples`` bounds the train split (evenly spaced, every class kept)."""

    def __init__(self, name: str, train: str, val: str, *, storage_options: dict | None = None, max_samples: int = 0):
        self.name, self.train_spec, self.val_spec = name, train, val
        self.storage_options, self.max_samples = storage_options, max_samples
        self._decoded: dict[int, tuple[LabelledSet, LabelledSet]] = {}

    def at(self, img_size: int) -> tuple[LabelledSet, LabelledSet]:
        """(train, val) decoded at ``img_size``. Raises :class:`EvalDataError` when they cannot serve; a storage
        outage (:class:`ShardReadError`, not permanent) is raised as it is, to be tried again."""
        if img_size not in self._decoded:
            t0 = time.perf_counter()
            try:
                train = load_labelled(self.train_spec, img_size, storage_options=self.storage_options,
                                      max_samples=self.max_samples)
                val = load_labelled(self.val_spec, img_size, storage_options=self.storage_options)
                check_classes(train.spec, train.classes, val.spec, val.classes)
            except ShardReadError as e:
                if not e.permanent:
                    raise
                raise EvalDataError(f"the eval data cannot be read: {e}") from e
            except (ValueError, FileNotFoundError) as e:
                raise EvalDataError(str(e)) from e
            log.info("eval data %s: %d train / %d val images, %d classes, %dpx (decoded in %.1f s, kept in memory)",
                     self.name, len(train), len(val), train.num_classes, img_size, time.perf_counter() - t0)
            self._decoded[img_size] = (train, val)
        return self._decoded[img_size]


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU; full precision on a CPU (which emulates bf16 slowly)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def probe_inputs(encoder, images_BHWC: torch.Tensor, layers: int = 6, causal: bool = True) -> dict[str, torch.Tensor]:
    """Both probes' inputs from ``uint8`` images (on the encoder's device), one forward:
    ``{"linear": [B, D], "attentive": [B, N, D]}``."""
    x = normalize_on_device(images_BHWC)
    with autocast_for(x.device):
        outs = encoder.forward_intermediates(x, layers=min(layers, len(encoder.blocks)), causal=causal,
                                             raster_order=False)
        return {"linear": encoder.norm(outs[-1]).mean(dim=1), "attentive": torch.stack(outs).mean(dim=0)}


@dataclass
class Features:
    linear: torch.Tensor  # [N, D] float32
    attentive: torch.Tensor  # [N, T, D] float16 (halves memory; the probes compute in float32)
    labels: torch.Tensor  # [N]
    images_per_sec: float = 0.0


def extract(encoder, data: LabelledSet, *, device: torch.device, batch_size: int = 128, layers: int = 6,
            causal: bool = True) -> Features:
    """Probe inputs for a whole set; features stay on ``device``."""
    encoder.to(device)
    lin, att = [], []
    t0 = time.perf_counter()
    for i in range(0, len(data), batch_size):
        f = probe_inputs(encoder, data.images[i:i + batch_size].to(device, non_blocking=True), layers, causal)
        lin.append(f["linear"].float()), att.append(f["attentive"].to(torch.float16))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return Features(torch.cat(lin), torch.cat(att), data.labels.to(device), len(data) / max(dt, 1e-9))
