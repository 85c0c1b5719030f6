"""The paper's probing protocol, offline, on a final encoder (``launchers/probe.py``).

Frozen encoder; linear and attentive probes; AdamW for 100 epochs, cosine from the peak
learning rate to 1e-5, every learning rate of the sweep {1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3,
4e-3} trained side by side on the same augmented batches (one encoder forward feeds all
heads), gradients clipped to 3.0 per head. Training images: random resized crop (scale
0.08–1, ratio 3/4–4/3) and horizontal flip, through the training loader; validation: resize to
size/0.875 and centre crop. What differs from the paper's setup is listed in docs/EVAL.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from ..data.eval_loader import eval_batches
from ..data.shards import resolve
from ..data.train_loader import TrainLoader, TrainSpec
from .features import check_classes, probe_inputs, read_classes
from .probes import ProbeBank, best_of

log = logging.getLogger("xtra_ds.eval")

PAPER_LRS = [1e-4, 3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 4e-3]


@dataclass
class Protocol:
    probes: tuple = ("linear", "attentive")
    epochs: int = 100
    lrs: list = field(default_factory=lambda: list(PAPER_LRS))
    batch_size: int = 1024
    weight_decay: float = 0.05
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0
    clip: float = 3.0
    layers: int = 6
    heads: int = 16
    causal: bool = True
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    num_workers: int = 4
    seed: int = 0


def run_protocol(encoder, train: str, val: str, p: Protocol, *, device: torch.device,
                 storage_options: dict | None = None) -> dict:
    """Train every (probe, lr) head; returns top-1 on ``val`` per probe and learning rate."""
    img = encoder.sizes.img_size
    classes_t = read_classes(train, storage_options)
    check_classes(train, classes_t, val, read_classes(val, storage_options))
    tshards = resolve(train, storage_options)
    spec = TrainSpec(shards=tshards, global_batch=p.batch_size, img_size=img, num_workers=p.num_workers, seed=p.seed,
                     scale=tuple(p.scale), ratio=tuple(p.ratio), hflip=p.hflip, storage_options=storage_options)
    loader = TrainLoader(spec, pin_memory=device.type == "cuda")
    per_epoch = loader.steps_per_epoch()
    total = p.epochs * per_epoch
    num_classes = len(classes_t) or None
    encoder.to(device)
    banks: dict[str, ProbeBank] = {}
    t0, seen, it = time.perf_counter(), 0, iter(loader)
    for step in range(total):
        batch = next(it)
        y = batch["labels"].to(device, non_blocking=True)
        if (y < 0).any():
            raise ValueError(f"{train}: samples without a class label; probes need labelled shards")
        feats = probe_inputs(encoder, batch["images"].to(device), p.layers, p.causal)
        if not banks:  # sized from the first batch: width from the features, classes from the manifest
            n_cls = num_classes or int(y.max()) + 1
            banks = {k: ProbeBank(k, feats[k].shape[-1], n_cls, p.lrs, total_steps=total, weight_decay=p.weight_decay,
                                  min_lr=p.min_lr, warmup_steps=int(p.warmup_epochs * per_epoch), clip=p.clip,
                                  num_heads=p.heads).to(device) for k in p.probes}
        losses = {k: bank.train_step(feats[k].float(), y) for k, bank in banks.items()}
        seen += len(y)
        if (step + 1) % per_epoch == 0:
            ep = (step + 1) // per_epoch
            if ep == 1 or ep % max(1, p.epochs // 10) == 0 or ep == p.epochs:
                log.info("epoch %d/%d  %.0f img/s  lowest loss %s", ep, p.epochs, seen / (time.perf_counter() - t0),
                         ", ".join(f"{k} {float(v.min()):.3f}" for k, v in losses.items()))
    correct = {k: torch.zeros(len(p.lrs), device=device) for k in banks}
    n_val = 0
    for b in eval_batches(resolve(val, storage_options), batch_size=min(256, p.batch_size), img_size=img,
                          num_workers=min(p.num_workers, 2), storage_options=storage_options):
        y = b["labels"].to(device)
        feats = probe_inputs(encoder, b["images"].to(device), p.layers, p.causal)
        for k, bank in banks.items():
            correct[k] += bank.correct(feats[k].float(), y)
        n_val += len(y)
    return {"probes": {k: best_of(correct[k], n_val, p.lrs) for k in banks}, "epochs": p.epochs,
            "train_images_per_epoch": per_epoch * p.batch_size,
            "val_images": n_val, "seconds": time.perf_counter() - t0}


def table(results: dict) -> str:
    """The results as a plain-text table: one row per learning rate, best per probe starred."""
    probes = list(results["probes"])
    lrs = list(next(iter(results["probes"].values()))["per_lr"]) if probes else []
    head = f"{'lr':>8}  " + "  ".join(f"{k + ' top-1':>16}" for k in probes)
    rows = [head, "-" * len(head)]
    for lr in lrs:
        cells = []
        for k in probes:
            r = results["probes"][k]
            star = " *" if f"{r['lr']:g}" == lr else "  "
            cells.append(f"{100 * r['per_lr'][lr]:>13.2f}%{star}")
        rows.append(f"{lr:>8}  " + "  ".join(cells))
    rows.append("(* best learning rate per probe)")
    return "\n".join(rows)


def protocol_for(dataset, base: Protocol, overrides: dict) -> Protocol:
    """The protocol of one suite dataset (:class:`~xtra_ds.eval.suite.SuiteDataset`): ``base``, the suite's
    settings for it, then ``overrides`` (what the command line set explicitly)."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(Protocol)}
    unknown = set(dataset.protocol) - known
    if unknown:
        raise ValueError(f"suite dataset {dataset.name}: unknown protocol settings {sorted(unknown)} "
                         f"(known: {', '.join(sorted(known))})")
    settings = {**dataset.protocol, **overrides}
    if "probes" in settings:
        settings["probes"] = tuple(settings["probes"])
    return replace(base, **settings)


def run_suite(encoder, suite, datasets, base: Protocol, overrides: dict, *, device: torch.device,
              storage_options: dict | None = None) -> tuple[dict, dict]:
    """The protocol on every dataset of ``datasets`` (of ``suite``): (per-dataset results, the suite table with
    the mean per probe, :func:`xtra_ds.eval.suite.suite_table`). A dataset that cannot be probed is reported
    with the reason and leaves the mean unwritten; the others still run."""
    from ..rundir import LedgerEntry
    from .suite import check_class_count, suite_table

    results, outcomes = {}, {}
    for d in datasets:
        check_class_count(d, storage_options)  # before anything is probed for hours
    for d in datasets:
        p = protocol_for(d, base, overrides)
        log.info("%s (%s): %d epochs, batch %d, %d learning rates, %s", d.name, d.title, p.epochs, p.batch_size,
                 len(p.lrs), "/".join(p.probes))
        try:
            res = run_protocol(encoder, d.train, d.val, p, device=device, storage_options=storage_options)
        except (ValueError, FileNotFoundError, OSError) as e:
            log.error("%s: %s", d.name, e)
            outcomes[d.name] = LedgerEntry(dataset=d.name, status=LedgerEntry.FAILED, reason=str(e))
            continue
        results[d.name] = res
        outcomes[d.name] = LedgerEntry(dataset=d.name, status=LedgerEntry.DONE,
                                       top1={k: r["top1"] for k, r in res["probes"].items()})
    for d in suite.datasets:  # a dataset left out (--only): the mean needs all of them
        outcomes.setdefault(d.name, LedgerEntry(dataset=d.name, status="not run", reason="left out (--only)"))
    return results, suite_table(suite, outcomes)
