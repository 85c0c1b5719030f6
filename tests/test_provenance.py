"""Provenance: the samples of each optimizer step, worked out from the config and the shards' lists, are the ones
the real loader delivered on every layout; the launcher prints them and checks the run's own digest."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_loader import global_steps, spec, take

from data_prep import shard as shard_tool
from xtra_ds.config import Config, load_config, save_config
from xtra_ds.data import TrainLoader, resolve
from xtra_ds.data.provenance import DIGEST_METRIC, OrderUnknown, keys_digest, step_provenance
from xtra_ds.data.samples import keys_of
from xtra_ds.data.shards import stats_url
from xtra_ds.rundir import CHECKPOINTS, COMPLETE, CONFIG, METRICS, CheckpointRecord, RunDir, tag_of

from helpers.corpus import plain_corpus

ROOT = Path(__file__).resolve().parents[1]


def _launcher():
    spec = importlib.util.spec_from_file_location("inspect_batch", ROOT / "launchers/inspect_batch.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


describe_step = _launcher().describe_step


def sharded(root: Path, n: int, per_shard: int, duplicate: bool = True, name: str = "shard") -> str:
    """``n`` images (and, with ``duplicate``, byte copies of three of them: the copies that land in another shard
    than their original are written, and excluded by the manifest) sharded by data_prep, ``per_shard`` to a
    shard; returns the manifest."""
    plain_corpus(root / "in", n, size=(64, 48), classes=3)
    for i in range(3 if duplicate else 0):
        shutil.copy(root / f"in/class{i}/img{i:04d}.jpg", root / f"in/class2/zz_copy{i}.jpg")
    out = root / "shards"
    assert shard_tool.main([str(root / "in"), "--output", str(out), "--name", name, "--shard-samples",
                            str(per_shard), "--workers", "1", "--min-side", "16"]) == 0
    return str(out / "manifest.json")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    out = sharded(tmp_path_factory.mktemp("prov"), 45, 7)
    excluded = [k for s in json.loads(Path(out).read_text())["shards"] for k in s["excluded"]]
    assert excluded, "the corpus has no excluded duplicate: the test would not exercise the exclusion"
    return out


def listed(shards, steps, start: int = 1, **kw) -> list[list[str]]:
    """The tool's keys of global steps ``start`` … ``start + steps - 1``."""
    return [step_provenance(spec(shards, **kw), n).keys for n in range(start, start + steps)]


def run_dir(tmp_path: Path, manifest: str, **data) -> tuple[RunDir, Config]:
    """A run directory with the config.yaml training would write for the tests' loader settings (:func:`spec`)."""
    overrides = [f"data.train={manifest}", "optim.global_batch_size=8", "optim.micro_batch_size=4", "seed=3",
                 "data.shuffle_buffer=5", *(f"data.{k}={v}" for k, v in data.items())]
    root = tmp_path / "run"
    root.mkdir()
    cfg = load_config(None, overrides)
    save_config(cfg, root / CONFIG)
    return RunDir(str(root)), cfg


def save_record(run: RunDir, step: int, loader: TrainLoader) -> None:
    """A checkpoint's COMPLETE with the loader's position, as the trainer writes it."""
    state = loader.state_dict()
    data = {k: state[k] for k in ("epoch", "step", "steps_per_epoch", "global_batch", "streams", "seed", "shards",
                                  "weights", "shuffle")}
    folder = Path(run.path(CHECKPOINTS, tag_of(step)))
    folder.mkdir(parents=True)
    (folder / COMPLETE).write_text(CheckpointRecord(step=step, data=json.loads(json.dumps(data))).to_json())


def inspect_batch(run: RunDir, step: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launchers/inspect_batch.py"), run.url, "--step", str(step)],
                          capture_output=True, text=True, timeout=300)


def sample_lines(lines: list[str]) -> list[str]:
    """The keys of :func:`describe_step`'s sample lines."""
    return [line.split("\t")[0] for line in lines if not line.startswith("#")]


def test_the_listing_is_what_the_loader_delivered_on_every_layout(manifest):
    """For 2 ranks × 2 workers, 1 rank × 1 worker and a resume from 2 ranks mid-epoch onto 3 ranks, the keys each
    step delivered (concatenated over ranks in rank order) are the tool's, step for step, over an epoch boundary;
    the duplicate the manifest excludes is in no listing."""
    shards = resolve(manifest)
    steps = TrainLoader(spec(shards)).steps_per_epoch()
    n = steps + 3
    expected = listed(shards, n)
    excluded = frozenset().union(*(s.excluded for s in shards))
    assert not excluded & {k for step in expected for k in step}
    for world, workers in ((2, 2), (1, 1)):
        delivered, _, _ = global_steps(shards, world, workers, n)
        assert delivered == expected, f"{world} ranks × {workers} workers"
    first, _, loaders = global_steps(shards, 2, 0, 3)
    rest, _, _ = global_steps(shards, 3, 0, n - 3, state=loaders[0].state_dict())
    assert first + rest == expected, "saved by 2 ranks after 3 steps, resumed on 3"


def test_steps_per_epoch_follow_the_source_weights(tmp_path):
    """Two sources, weights 0.5 and 1.5: the epochs' step counts differ, and the tool still names each step's
    samples as the loader delivered them, through the third epoch."""
    a, b = sharded(tmp_path / "a", 30, 7, False, "a"), sharded(tmp_path / "b", 20, 3, False, "b")  # uneven shards
    shards = resolve([{"url": a}, {"url": b}])
    kw = dict(weights=[0.5, 1.5], global_batch=4)
    loader = TrainLoader(spec(shards, **kw))
    counts = [loader.steps_per_epoch(e) for e in range(3)]
    assert len(set(counts)) > 1, f"epochs of equal length {counts}: the test would not tell the walks apart"
    n = sum(counts)
    delivered, _, _ = global_steps(shards, 2, 0, n, **kw)
    assert delivered == listed(shards, n, **kw)


def test_keys_from_tar_headers_when_the_stats_list_no_samples(manifest, tmp_path, monkeypatch):
    """Stats files of an older data_prep (no ``samples``): the keys come from the tar headers — the same keys,
    the excluded duplicate still left out, no member read — and the listing says so."""
    src = Path(manifest).parent
    old = tmp_path / "old"
    shutil.copytree(src, old)
    for stats in old.glob("*.stats.json"):
        doc = json.loads(stats.read_text())
        del doc["samples"]
        stats.write_text(json.dumps(doc))
    new, older = resolve(manifest), resolve(str(old / "manifest.json"))
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a, **k: pytest.fail("a member was read"))
    for shard, then in zip(new, older, strict=True):
        keys = keys_of(then.url, None, excluded=then.excluded)
        assert keys == [row[0] for row in json.loads(Path(stats_url(shard.url)).read_text())["samples"]
                        if row[0] not in shard.excluded]
    steps = TrainLoader(spec(new)).steps_per_epoch()
    for n in (1, steps):
        got, want = step_provenance(spec(older), n), step_provenance(spec(new), n)
        assert got.keys == want.keys and got.from_headers and not want.from_headers
        assert set(got.from_headers) == set(got.urls)
    run, cfg = run_dir(tmp_path, str(old / "manifest.json"))
    lines = describe_step(run, cfg, 2)
    assert sample_lines(lines) == step_provenance(spec(new), 2).keys
    assert any(line.startswith("# keys of ") and "read from their tar headers" in line for line in lines)


def test_the_digest_is_layout_free_and_sees_one_changed_key(manifest):
    """The sum of the ranks' digests of a step is the digest of the global batch for 1, 3 and 8 ranks, in any
    order; one key changed changes it; it fits an int64 all-reduce."""
    shards = resolve(manifest)
    keys = take(TrainLoader(spec(shards, num_workers=0)), 2)[1]["keys"]
    digest = keys_digest(keys)
    for world in (3, 8):
        ranks = [take(TrainLoader(spec(shards, num_workers=0, rank=r, world_size=world)), 2)[1]["keys"]
                 for r in range(world)]
        assert sum(keys_digest(share) for share in ranks) == digest and sorted(sum(ranks, [])) == sorted(keys)
    assert keys_digest(keys[::-1]) == digest
    other = [k for k in (f"{i:010d}" for i in range(100)) if k not in keys][0]
    assert keys_digest([other, *keys[1:]]) != digest
    assert 0 < digest < len(keys) << 40 < 2**63


def test_inspect_batch_prints_a_step_and_checks_the_runs_digest(tmp_path):
    """A run whose shards hold a sample that does not decode: metrics.jsonl gets the digest of what the loader
    delivered each step (as the trainer logs it). The launcher lists a step's keys and shard URLs as delivered,
    says the digests agree; at the step where the loader put a neighbour in the corrupt sample's place it lists
    the planned sample and says MISMATCH, and why that can be."""
    out = sharded(tmp_path, 20, 10, duplicate=False)
    tar = Path(out).parent / "shard-000001.tar"
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    bad = [name for name, _ in members if name.endswith(".jpg")][2].split(".")[0]
    with tarfile.open(tar, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            data = b"\xff\xd8\xff not a JPEG" if name == f"{bad}.jpg" else data
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    run, _ = run_dir(tmp_path, out)
    shards = resolve(out)
    loader = TrainLoader(spec(shards, num_workers=0))
    delivered = [b["keys"] for b in take(loader, loader.steps_per_epoch())]
    assert loader.corrupt_skipped == 1
    rows = [{"step": n, "train/loss": 1.0, DIGEST_METRIC: keys_digest(keys)} for n, keys in enumerate(delivered, 1)]
    Path(run.path(METRICS)).write_text("".join(json.dumps(r) + "\n" for r in rows))
    planned = listed(shards, len(delivered))
    hit = next(n for n, keys in enumerate(planned, 1) if bad in keys)
    assert planned[hit - 1] != delivered[hit - 1] and bad not in delivered[hit - 1]
    fine = next(n for n in range(1, len(delivered) + 1) if n != hit)
    assert planned[fine - 1] == delivered[fine - 1]
    shard_of = {row[0]: shard.url for shard in shards
                for row in json.loads(Path(stats_url(shard.url)).read_text())["samples"]}

    r = inspect_batch(run, fine)
    assert r.returncode == 0, r.stderr
    lines = [line.split("\t") for line in r.stdout.splitlines() if not line.startswith("#")]
    assert [key for key, _, _ in lines] == delivered[fine - 1]
    assert [url for _, url, _ in lines] == [shard_of[key] for key in delivered[fine - 1]]
    assert all(source.endswith(".jpg") for _, _, source in lines)
    assert f"epoch 0, step {fine - 1} of its {len(delivered)}" in r.stdout and "the same" in r.stdout

    r = inspect_batch(run, hit)
    assert r.returncode == 0, r.stderr
    assert bad in r.stdout and "MISMATCH" in r.stdout and "did not decode" in r.stdout


def test_an_order_change_mid_run_is_said_not_answered(manifest, tmp_path):
    """A run saved after step 3 with seed 4, resumed with seed 3 and data.on_order_change=next_epoch (its config.yaml
    now says seed 3), saved again after step 5. Steps after 5 are listed as the resumed loader delivered them,
    counted from that checkpoint; steps up to 5 are refused with the reason — also once the seed-4 checkpoint
    is pruned (the step-5 record then stands where a run from the start would not); the launcher exits 1."""
    shards = resolve(manifest)
    old = TrainLoader(spec(shards, num_workers=0, seed=4))
    take(old, 3)
    new = TrainLoader(spec(shards, num_workers=0, on_order_change="next_epoch"))
    new.load_state_dict(old.state_dict())
    it = iter(new)
    delivered = {n: next(it)["keys"] for n in (4, 5)}
    run, cfg = run_dir(tmp_path, manifest, on_order_change="next_epoch")
    save_record(run, 3, old)
    save_record(run, 5, new)
    delivered.update({n: next(it)["keys"] for n in (6, 7)})
    assert delivered[6] != step_provenance(spec(shards), 6).keys, "the change moved nothing: the test proves nothing"
    for n in (6, 7):
        lines = describe_step(run, cfg, n)
        assert sample_lines(lines) == delivered[n] and "counted from the checkpoint of step 5" in "\n".join(lines)
    for n in (2, 5):
        with pytest.raises(OrderUnknown, match="checkpoint step 3 was saved in another order \\(seed 4→3\\)"):
            describe_step(run, cfg, n)
    shutil.rmtree(run.path(CHECKPOINTS, tag_of(3)))  # pruned (keep-last-k)
    assert sample_lines(describe_step(run, cfg, 7)) == delivered[7]
    with pytest.raises(OrderUnknown, match="checkpoint step 5 stood at epoch 1, step 2, where this config's order"):
        describe_step(run, cfg, 4)
    r = inspect_batch(run, 4)
    assert r.returncode == 1 and "the data order changed during this run" in r.stderr and not r.stdout
