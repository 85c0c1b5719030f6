"""The evaluation loader: every sample of a labelled shard set once, resized and centre-cropped."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .samples import image_of, read_segment
from .shards import Segment, Shard
from .transforms import decode_eval
from .workers import WORKER_START_METHOD, worker_init

log = logging.getLogger(__name__)


class _EvalStream(IterableDataset):
    def __init__(self, shards, batch_size, img_size, rank, world_size, options, retries, stride):
        self.shards, self.batch_size, self.img_size = shards, batch_size, img_size
        self.rank, self.world_size, self.options, self.retries = rank, world_size, options, retries
        self.stride = stride
        self.owner_pid = os.getpid()  # workers leave when this process is gone (data.workers.watch_owner)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        starts = np.cumsum([0] + [sh.num_samples for sh in self.shards])  # global index of each shard's first sample
        mine = range(len(self.shards))[self.rank * nw + wid::self.world_size * nw]
        images, labels, keys = [], [], []
        for i in mine:
            sh = self.shards[i]
            for j, s in enumerate(read_segment(Segment(sh, 0, sh.num_samples), self.options, self.retries)):
                if (starts[i] + j) % self.stride:
                    continue  # not in the evenly spaced subset (skipped before decoding)
                data = image_of(s)
                try:
                    img = decode_eval(data, self.img_size)
                except Exception as e:
                    log.warning("eval sample %s in %s does not decode (%s); skipped", s["__key__"], sh.url, e)
                    continue
                images.append(img), labels.append(int(s.get("cls", b"-1"))), keys.append(s["__key__"])
                if len(images) == self.batch_size:
                    yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels), "keys": keys}
                    images, labels, keys = [], [], []
        if images:
            yield {"images": torch.from_numpy(np.stack(images)), "labels": torch.tensor(labels), "keys": keys}


def eval_batches(shards: list[Shard], *, batch_size: int, img_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, storage_options: dict | None = None, retries: int = 8, stride: int = 1):
    """Every sample of ``shards`` once (this rank's share), resized + centre-cropped, in batches.
    ``stride`` > 1 keeps every stride-th sample of the whole set, evenly spaced (shards written in
    class order keep every class)."""
    ds = _EvalStream(shards, batch_size, img_size, rank, world_size, storage_options, retries, max(1, stride))
    return DataLoader(ds, batch_size=None, num_workers=num_workers,
                      multiprocessing_context=WORKER_START_METHOD if num_workers else None,
                      worker_init_fn=worker_init if num_workers else None)
