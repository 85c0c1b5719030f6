"""Provenance: which samples made each optimizer step, worked out from the run's config alone.

The data order is layout-free (:mod:`.order`, :mod:`.shards`): global step ``N`` is (epoch, step of the
epoch) by the epochs' step counts, its canonical order is ``q`` positions of every stream, and a stream
position is a sample through :meth:`~.shards.EpochPlan.read_index` and :meth:`~.shards.EpochPlan.locate`
— the functions the loader itself reads by. What remains is a shard's usable sample number → its key,
which data_prep writes into every shard's stats file (``samples: [[key, sha256, source], …]``, in tar
order); for older outputs without that list the keys come from the tar headers (:func:`~.samples.keys_of`).
No image is read.

    python launchers/inspect_batch.py runs/b16 --step 12345

:func:`keys_digest` is what the trainer logs every step (``data/keys_digest`` in ``metrics.jsonl``): the
tool computes it for its listing and says whether the run trained on the same keys.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config.schema import Config
from ..storage import filesystem, read_json
from .build import train_spec, training_data
from .remote import ShardReadError
from .samples import keys_of
from .shards import Shard, stats_url
from .train_loader import TrainSpec, describe_changes, order_changes

DIGEST_BITS = 40
DIGEST_METRIC = "data/keys_digest"


def keys_digest(keys: list[str]) -> int:
    """An order-free digest of a batch's sample keys: the sum of a 40-bit hash (BLAKE2b) of each key.

    A sum, so the digest of a global batch is the sum of its ranks' digests whatever the layout (one
    int64 all-reduce), and a key's place in the batch does not count. 40 bits because the sum of ``G``
    of them stays below ``G · 2⁴⁰``: exact in an int64 up to ``G`` = 8 million images, and as a float64
    (a JSON reader, TensorBoard) up to ``G`` = 8192; a changed key goes unnoticed with odds of 2⁻⁴⁰.
    Log it as an integer."""
    return sum(int.from_bytes(hashlib.blake2b(k.encode(), digest_size=DIGEST_BITS // 8).digest(), "big")
               for k in keys)


@dataclass(frozen=True)
class Anchor:
    """A known data position: after ``global_step`` optimizer steps the loader stood at (``epoch``, ``step``
    of it done). The start of a run is (0, 0, 0); a checkpoint's record is another."""

    global_step: int
    epoch: int
    step: int


START = Anchor(0, 0, 0)


class OrderUnknown(RuntimeError):
    """The run's config does not describe the data order of the step asked about (it changed mid-run)."""


def epoch_step(spec: TrainSpec, global_step: int, anchor: Anchor = START) -> tuple[int, int]:
    """(epoch, step of the epoch, 0-based) of optimizer step ``global_step`` (1-based, as the trainer counts),
    walking the epochs as :class:`~.train_loader.TrainLoader` does from ``anchor``: an epoch has
    ``spec.plan(epoch).steps`` steps, which differ between epochs when source weights subsample shards."""
    if global_step <= anchor.global_step:
        raise ValueError(f"step {global_step} is not after the anchor's step {anchor.global_step}")
    epoch, step, left = anchor.epoch, anchor.step, global_step - anchor.global_step - 1
    while True:
        steps = spec.plan(epoch).steps
        if step + left < steps:
            return epoch, step + left
        left -= max(0, steps - step)
        epoch, step = epoch + 1, 0


def step_samples(spec: TrainSpec, epoch: int, step: int) -> list[tuple[Shard, int]]:
    """(shard, usable sample number in it) of every sample of (``epoch``, ``step``), in the canonical order:
    one rank's pieces of a 1-rank layout, read position by position as the loader's streams read them."""
    plan, q = spec.plan(epoch), spec.order.per_stream
    return [plan.locate(piece.stream, plan.read_index(piece.stream, step * q + j))
            for piece in spec.order.pieces(0, 1) for j in range(piece.lo, piece.hi)]


@dataclass(frozen=True)
class ShardSamples:
    """A shard's usable samples in tar order: keys, their sources (the inputs data_prep made them of; empty
    when unknown) and whether the keys came from the tar headers (no sample list in the stats file)."""

    keys: list[str]
    sources: list[str]
    from_headers: bool = False


def shard_samples(shard: Shard, storage_options: dict | None = None, retries: int = 8) -> ShardSamples:
    """The usable samples of ``shard``: its stats file's sample list without the manifest's excluded duplicates,
    or, for a stats file without one (or none), the keys in its tar headers."""
    fs, path = filesystem(stats_url(shard.url), storage_options)
    try:
        listed = read_json(fs, path).get("samples")
    except FileNotFoundError:
        listed = None
    if listed is None:
        keys, sources, headers = keys_of(shard.url, storage_options, excluded=shard.excluded, retries=retries), [], True
    else:
        usable = [row for row in listed if row[0] not in shard.excluded]
        keys, sources, headers = [row[0] for row in usable], [row[2] for row in usable], False
    if len(keys) != shard.num_samples:
        where = "its tar headers" if headers else stats_url(shard.url)
        raise ShardReadError.of(shard.url, f"{where} name{'' if headers else 's'} {len(keys)} usable samples, the "
                                           f"manifest {shard.num_samples} (shard rewritten since the run's "
                                           f"manifest was made?)")
    return ShardSamples(keys, sources, headers)


@dataclass
class StepProvenance:
    """Global step ``global_step``: its place in the data (epoch, step of it, of ``steps_in_epoch``) and its
    samples in canonical order (``keys``, ``urls``, ``sources``: one entry per sample)."""

    global_step: int
    epoch: int
    step: int
    steps_in_epoch: int
    keys: list[str]
    urls: list[str]
    sources: list[str]
    from_headers: list[str] = field(default_factory=list)  # shards whose keys came from their tar headers

    @property
    def digest(self) -> int:
        return keys_digest(self.keys)


def step_provenance(spec: TrainSpec, global_step: int, anchor: Anchor = START, threads: int = 16) -> StepProvenance:
    """The samples of optimizer step ``global_step`` (1-based) and where they are: :func:`epoch_step`,
    :func:`step_samples`, then the sample lists of the shards the step touches, read in parallel."""
    epoch, step = epoch_step(spec, global_step, anchor)
    where = step_samples(spec, epoch, step)
    shards = {shard.url: shard for shard, _ in where}
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        read = pool.map(lambda s: shard_samples(s, spec.storage_options, spec.retries), shards.values())
        lists = dict(zip(shards, read, strict=True))
    keys, sources = [], []
    for shard, n in where:
        listed = lists[shard.url]
        keys.append(listed.keys[n])
        sources.append(listed.sources[n] if listed.sources else "")
    return StepProvenance(global_step, epoch, step, spec.plan(epoch).steps, keys, [s.url for s, _ in where], sources,
                          sorted(url for url, listed in lists.items() if listed.from_headers))


# --- a run's checkpoints say where the order held -----------------------------------------------------
def order_anchor(spec: TrainSpec, saved: list[tuple[int, dict]], global_step: int) -> Anchor:
    """Where to count ``global_step`` from, given the run's checkpoints as (step, loader position and order: a
    ``COMPLETE`` record's ``data``), oldest first: the start, when every one agrees with ``spec``'s order (the
    same order, and the position the walk from the start gives); otherwise the first checkpoint after the last
    disagreement — a resume with ``data.on_order_change=next_epoch`` went on at another epoch, or in another
    order, from there. A step at or before it, or any step when no checkpoint is in ``spec``'s order since,
    raises :class:`OrderUnknown`. Only the checkpoints kept can tell: a change behind pruned ones that left
    the positions where the walk puts them is not seen (the run's logged digests are: :func:`digest_verdict`)."""
    planned, anchor, broke = spec.identity(), START, None
    for saved_step, data in saved:
        if not data or "epoch" not in data:
            continue  # a checkpoint from before the loader recorded its position
        changed = order_changes(data, planned)
        if changed:
            anchor = None
            broke = f"checkpoint step {saved_step} was saved in another order ({describe_changes(changed)})"
            continue
        here = Anchor(saved_step, data["epoch"], data["step"])
        if anchor is None:
            anchor = here
            continue
        if saved_step > anchor.global_step and _normal(spec, here) != _after(spec, saved_step, anchor):
            e, s = _after(spec, saved_step, anchor)
            broke = (f"checkpoint step {saved_step} stood at epoch {data['epoch']}, step {data['step']}, where "
                     f"this config's order puts epoch {e}, step {s} (a resume went on at another epoch)")
            anchor = here
    if broke is None:
        return START
    if anchor is None:
        raise OrderUnknown(f"the data order changed during this run: {broke}, and no checkpoint since is in the "
                           f"order of config.yaml; step {global_step} cannot be told from it")
    if global_step <= anchor.global_step:
        raise OrderUnknown(f"the data order changed during this run: {broke}. Steps after {anchor.global_step} "
                           f"(its checkpoint is in config.yaml's order, at epoch {anchor.epoch}, step {anchor.step}) "
                           f"are known; step {global_step} came before, in an order config.yaml no longer describes")
    return anchor


def _normal(spec: TrainSpec, at: Anchor) -> tuple[int, int]:
    """(epoch, steps done) with a finished epoch written as the start of the next (the loader saves either)."""
    epoch, step = at.epoch, at.step
    while step >= spec.plan(epoch).steps:
        epoch, step = epoch + 1, 0
    return epoch, step


def _after(spec: TrainSpec, global_step: int, anchor: Anchor) -> tuple[int, int]:
    """The loader's position once ``global_step`` steps are done, counted from ``anchor``."""
    epoch, step = epoch_step(spec, global_step, anchor)
    return _normal(spec, Anchor(global_step, epoch, step + 1))


def digest_verdict(prov: StepProvenance, logged: int | None) -> list[str]:
    """What the run's own :data:`DIGEST_METRIC` of the step (``logged``; None: not logged) says of this listing."""
    if logged is None:
        return [f"metrics.jsonl has no {DIGEST_METRIC} for step {prov.global_step}: nothing to check this listing "
                f"against (runs log it every step from this version on)"]
    if int(logged) == prov.digest:
        return [f"{DIGEST_METRIC} logged by the run: {logged}, the same: the run trained on exactly these keys"]
    return [f"{DIGEST_METRIC} logged by the run: {logged}, MISMATCH: the run trained on other keys than these.",
            "  Either a sample of this step did not decode and the loader put the nearest sample of its shuffle "
            "chunk in its place (it learns that only when decoding; see data/corrupt_skipped in metrics.jsonl and "
            "'does not decode' in logs/rank*.log),",
            "  or the data order is not the one config.yaml and the checkpoints describe (shards rewritten in place, "
            "config.yaml edited, an order change no kept checkpoint recorded)."]


def run_spec(cfg: Config) -> TrainSpec:
    """The data order of a run with config ``cfg``, as its loaders build it (one rank stands for any layout)."""
    return train_spec(cfg.data, training_data(cfg.data), seed=cfg.seed, rank=0, world_size=1,
                      global_batch=cfg.optim.global_batch_size, img_size=1)
