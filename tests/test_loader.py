"""The streaming loader: exact resume, balance across ranks, S3 with a server restart, corrupt data."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import threading
import time
from collections import Counter

import pytest
import torch

from data_prep import shard as shard_tool
from xtra_ds.data import ShardReadError, TrainLoader, TrainSpec, eval_batches, normalize_on_device, resolve
from xtra_ds.engine.dist import free_port

from helpers.corpus import plain_corpus


def make_shards(tmp_path, n=61, per_shard=7, output=None, extra=()):
    plain_corpus(tmp_path / "in", n, size=(80, 60), classes=3)
    out = output or str(tmp_path / "shards")
    assert shard_tool.main([str(tmp_path / "in"), "--output", out, "--shard-samples", str(per_shard),
                            "--workers", "1", "--min-side", "16", *extra]) == 0
    return out


def spec(shards, **kw):
    base = dict(global_batch=8, img_size=32, num_workers=2, seed=3, shuffle=5)
    base.update(kw)
    return TrainSpec(shards, **base)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return resolve(make_shards(tmp_path_factory.mktemp("loader")))


def global_steps(shards, world, workers, n, state=None, **kw):
    """The first ``n`` global batches (keys, images: every rank's share, in rank order) of a layout,
    optionally resumed from ``state``; and the ranks' loaders."""
    loaders, per_rank = [], []
    for rank in range(world):
        loader = TrainLoader(spec(shards, rank=rank, world_size=world, num_workers=workers, **kw))
        if state is not None:
            loader.load_state_dict(state)
        loaders.append(loader)
        per_rank.append(take(loader, n))
    keys = [[k for r in range(world) for k in per_rank[r][s]["keys"]] for s in range(n)]
    images = [torch.cat([per_rank[r][s]["images"] for r in range(world)]) for s in range(n)]
    return keys, images, loaders


def test_global_batches_do_not_depend_on_the_layout(shards):
    """Global step t holds the same samples — the same pixels, in the same canonical order — on 1, 3 or 8
    ranks with 0, 2 or 3 workers each, across an epoch boundary; rank shares differ by at most one."""
    steps = TrainLoader(spec(shards)).steps_per_epoch()
    n = steps + 3
    keys, images, _ = global_steps(shards, 1, 0, n)
    assert len({k for step in keys[:steps] for k in step}) == steps * 8  # distinct samples, a real epoch
    for world, workers in ((1, 3), (3, 2), (8, 0)):
        got_keys, got_images, loaders = global_steps(shards, world, workers, n)
        assert got_keys == keys, f"{world} ranks × {workers} workers"
        assert all(torch.equal(a, b) for a, b in zip(got_images, images, strict=True))
        assert {loader.steps_per_epoch() for loader in loaders} == {steps}
        shares = {loader.spec.share for loader in loaders}
        assert sum(loader.spec.share for loader in loaders) == 8 and max(shares) - min(shares) <= 1


def test_resume_on_another_layout_continues_the_same_batches(shards):
    """A position saved by 2 ranks × 2 workers continues exactly on 1 rank or 3 ranks × 2 workers:
    mid-epoch, at the last step of an epoch and in the next one."""
    steps = TrainLoader(spec(shards)).steps_per_epoch()
    n = steps + 4
    reference, _, _ = global_steps(shards, 1, 0, n)
    for k in (3, steps - 1, steps + 1):
        first, _, loaders = global_steps(shards, 2, 2 if k == 3 else 0, k)
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states) and states[0]["step"] == k % steps
        for world, workers in ((1, 0), (3, 2 if k == 3 else 0)):
            rest, _, _ = global_steps(shards, world, workers, n - k, state=states[0])
            assert first + rest == reference, f"saved after {k} steps, resumed on {world} × {workers}"


def _run(loader, n) -> tuple[list, set]:
    """``n`` steps of ``loader``: (epoch, step, keys, images) of each, and the worker pids that made each."""
    it, steps, pids = iter(loader), [], set()
    for _ in range(n):
        b = next(it)
        steps.append((b["epoch"], b["step"], b["keys"], b["images"].clone()))
        pids.add(tuple(loader.worker_pids))
    return steps, pids


def test_the_same_workers_serve_every_epoch(tmp_path):
    """Two weighted sources (epochs of different lengths), 2 workers, three epochs: the same two worker processes
    make every step, across both epoch boundaries; and every step's keys and pixels are those of its epoch read
    on its own from its first step (what a loader that started its workers per epoch delivered), and the keys
    those the order's listing names (data.provenance)."""
    from xtra_ds.data.provenance import step_provenance

    a = make_shards(tmp_path / "a", n=30, per_shard=7)
    b = make_shards(tmp_path / "b", n=20, per_shard=3)
    shards = resolve([{"url": a}, {"url": b}])
    kw = dict(weights=[0.5, 1.5], global_batch=4)
    loader = TrainLoader(spec(shards, num_workers=2, **kw))
    counts = [loader.steps_per_epoch(e) for e in range(3)]
    assert len(set(counts)) > 1, f"epochs of equal length {counts}: the test would not tell the walks apart"
    got, pids = _run(loader, sum(counts))
    (workers,) = pids  # one set of processes for all three epochs
    assert len(set(workers)) == 2 and os.getpid() not in workers
    expected = []
    for epoch, n in enumerate(counts):
        alone = TrainLoader(spec(shards, num_workers=0, **kw))
        alone.load_state_dict({**alone.state_dict(), "epoch": epoch, "step": 0})
        expected += _run(alone, n)[0]
    assert [s[:3] for s in got] == [s[:3] for s in expected]
    assert all(torch.equal(x[3], y[3]) for x, y in zip(got, expected, strict=True))  # each epoch's own crops
    assert [s[2] for s in got] == [step_provenance(spec(shards, **kw), n).keys for n in range(1, len(got) + 1)]


def test_resume_mid_epoch_and_at_an_epochs_end_with_persistent_workers(shards):
    """Saved mid-epoch, and after an epoch's last step (step = steps per epoch: the next epoch not begun), a loader
    with 2 workers continues exactly, through the following epoch boundary, with the same two worker processes."""
    steps = TrainLoader(spec(shards)).steps_per_epoch()
    n = 2 * steps + 2
    reference, _, _ = global_steps(shards, 1, 0, n)
    for k in (3, steps):
        first, _, loaders = global_steps(shards, 1, 0, k)
        state = loaders[0].state_dict()
        assert (state["epoch"], state["step"]) == (0, k)
        resumed = TrainLoader(spec(shards, num_workers=2))
        resumed.load_state_dict(state)
        rest, pids = _run(resumed, n - k)
        assert first + [s[2] for s in rest] == reference, f"saved after {k} steps"
        assert rest[-1][:2] == (2, 1)  # into the epoch after the next
        assert len(pids) == 1, f"saved after {k} steps: workers restarted at an epoch boundary ({pids})"


def test_fewer_streams_than_images_per_step(shards):
    """data.streams=2 (4 samples of each stream per step): ranks that split a stream between them still
    see the order one rank sees."""
    keys, _, _ = global_steps(shards, 1, 0, 5, streams=2)
    for world, workers in ((3, 0), (2, 2), (8, 0)):
        assert global_steps(shards, world, workers, 5, streams=2)[0] == keys
    assert global_steps(shards, 1, 0, 5)[0] != keys  # another order: data.streams is part of it


def test_every_sample_once_per_epoch_and_what_is_left_out(shards):
    for world in (1, 3):
        keys, _, loaders = global_steps(shards, world, 0, TrainLoader(spec(shards)).steps_per_epoch())
        counts = Counter(k for step in keys for k in step)
        assert set(counts.values()) == {1}, "a sample was used twice in one epoch"
        total = sum(s.num_samples for s in shards)
        plan = loaders[0].spec.plan(0)
        assert total - sum(counts.values()) == plan.left_out and 0 <= plan.left_out < 8 * (1 + 1)
    assert len({s.num_samples for s in shards}) > 1  # the shards really are uneven


def test_a_changed_data_order_is_refused_or_skips_to_the_next_epoch(shards, caplog):
    from xtra_ds.data.train_loader import DataOrderChanged

    a = TrainLoader(spec(shards))
    take(a, 3)
    state = a.state_dict()
    for change in ({"global_batch": 4}, {"seed": 4}, {"streams": 2}, {"shards": shards[:-1]}):
        b = TrainLoader(spec(**{"shards": shards, **change}))
        with pytest.raises(DataOrderChanged, match=f"another data order \\({next(iter(change))}"):
            b.load_state_dict(state)
    b = TrainLoader(spec(shards, global_batch=4, on_order_change="next_epoch"))
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(state)
    assert (b.epoch, b.step) == (1, 0) and "the rest of epoch 0 is not read" in caplog.text


def test_uint8_out_and_normalise_on_device(shards):
    b = take(TrainLoader(spec(shards, num_workers=0)), 1)[0]
    assert b["images"].dtype == torch.uint8 and b["labels"].tolist() != [-1] * 8
    x = normalize_on_device(b["images"])
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert -2.2 < x.min() and x.max() < 2.7


def test_corrupt_sample_is_skipped_and_counted(tmp_path, caplog):
    out = make_shards(tmp_path, n=20, per_shard=10)
    path = tmp_path / "shards" / "shard-000001.tar"
    members = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            members.append((m.name, tf.extractfile(m).read()))
    bad_key = members[3][0].split(".")[0]  # the second sample's image
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            if name == f"{bad_key}.jpg":
                data = b"\xff\xd8\xff garbage, not a JPEG"
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    loader = TrainLoader(spec(resolve(out), num_workers=0, global_batch=5))
    with caplog.at_level(logging.WARNING):
        batches = take(loader, loader.steps_per_epoch())
    assert loader.corrupt_skipped == 1
    assert all(len(b["keys"]) == 5 for b in batches)  # batch counts unchanged
    keys = [k for b in batches for k in b["keys"]]
    assert bad_key not in keys and len(keys) == 20
    (twice, n), = [(k, n) for k, n in Counter(keys).items() if n > 1]  # its place taken by a sample …
    assert n == 2 and len({j for b in batches for j, k in enumerate(b["keys"]) if k == twice}) == 1  # … of its stream
    again = TrainLoader(spec(resolve(out), num_workers=2, global_batch=5, world_size=2, rank=1))
    assert [k for b in take(again, 4) for k in b["keys"]] == [k for b in batches for k in b["keys"][2:]]
    assert f"sample {bad_key}" in caplog.text and "does not decode" in caplog.text


def test_unreadable_shard_names_its_url(tmp_path):
    out = make_shards(tmp_path, n=12, per_shard=4)
    shards = resolve(out)
    (tmp_path / "shards" / "shard-000001.tar").unlink()
    for workers in (0, 2):
        with pytest.raises(Exception, match="cannot read shard .*shard-000001.tar") as e:
            take(TrainLoader(spec(shards, num_workers=workers, global_batch=2)), 6)
        if workers == 0:
            assert isinstance(e.value, ShardReadError)


def test_brace_pattern_and_eval(tmp_path):
    out = make_shards(tmp_path, n=12, per_shard=5)
    shards = resolve(out + "/shard-{000000..000002}.tar")
    assert [s.num_samples for s in shards] == [5, 5, 2]
    seen = [k for b in eval_batches(shards, batch_size=5, img_size=24) for k in b["keys"]]
    assert sorted(seen) == sorted(f"{i:010d}" for i in range(12))


def test_s3_server_restart_mid_epoch(tmp_path, monkeypatch, caplog):
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="data")
        out = make_shards(tmp_path, n=40, per_shard=4, output="s3://data/train", extra=["--endpoint-url", endpoint])
        opts = {"endpoint_url": endpoint}
        shards = resolve(f"{out}/manifest.json", opts)
        ref = TrainLoader(spec(shards, num_workers=0, storage_options=opts, shuffle=4))
        expected = [b["keys"] for b in take(ref, ref.steps_per_epoch())]

        # s3fs and botocore retry too; turn theirs off so that the loader's own retry must act
        monkeypatch.setattr("s3fs.S3FileSystem.retries", 1)
        fast_fail = {**opts, "config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}}
        loader = TrainLoader(spec(shards, num_workers=0, storage_options=fast_fail, shuffle=4, retries=8))
        it = iter(loader)
        got = [next(it)["keys"] for _ in range(3)]
        server.stop()  # the endpoint goes away mid-epoch (connections refused) …
        server._server.server_close()

        def come_back():
            time.sleep(3)
            server._server = None
            server.start()  # … and returns (moto keeps its buckets in this process)
        t = threading.Thread(target=come_back)
        t.start()
        with caplog.at_level(logging.WARNING, logger="xtra_ds.data.remote"):
            got += [next(it)["keys"] for _ in range(loader.steps_per_epoch() - 3)]
        t.join()
        assert "retry 1/8" in caplog.text, "the outage was not seen: the test proves nothing"
        assert got == expected
    finally:
        server.stop()


def test_loader_from_config(shards, tmp_path):
    from xtra_ds.config import ConfigError, load_config
    from xtra_ds.data.build import train_loader, training_data

    url = shards[0].url.rsplit("/", 1)[0]
    cfg = load_config(None, [f"data.train={url}/manifest.json", "data.num_workers=0"])
    data = training_data(cfg.data)
    assert data.samples_per_pass == sum(s.num_samples for s in shards) and data.weights is None
    loader = train_loader(cfg.data, data, seed=0, rank=1, world_size=2, global_batch=8, img_size=32)
    assert loader.spec.share == 4 and loader.spec.rank == 1 and loader.spec.scale == (0.3, 1.0)
    mixed = load_config(None, [f"data.sources=[{{url: {url}}}, {{url: {url}, weight: 0.5}}]", "data.num_workers=0"])
    data = training_data(mixed.data)
    assert data.samples_per_pass == round(1.5 * sum(s.num_samples for s in shards))
    two = train_loader(mixed.data, data, seed=0, rank=0, world_size=1, global_batch=4, img_size=32)
    assert len(two.spec.plan(0).shards) == len(shards) + round(0.5 * len(shards))
    with pytest.raises(ConfigError, match="data.train is empty"):
        training_data(load_config(None, []).data)
    with pytest.raises(ConfigError, match="no shard manifest"):
        training_data(load_config(None, [f"data.train={tmp_path}"]).data)


def test_a_member_over_the_size_bound_is_refused_unread(tmp_path):
    plain_corpus(tmp_path / "in", 4, size=(640, 480), classes=1)  # ≈50 KB JPEGs
    assert shard_tool.main([str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--workers", "1",
                            "--max-side", "0"]) == 0
    shards = resolve(str(tmp_path / "out"))
    loader = TrainLoader(spec(shards, num_workers=0, global_batch=2, max_member_bytes=1000))
    with pytest.raises(ShardReadError, match=r"member \d{10}\.jpg holds more than the loader's bound of 1000 bytes "
                                             r"\(data.max_sample_bytes\)"):
        take(loader, 1)
    assert len(take(TrainLoader(spec(shards, num_workers=0, global_batch=2)), 1)) == 1


def _descendants_rss(pid: int) -> list[int]:
    """Resident bytes of every process below ``pid`` (workers may hang off a fork server)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            out.append(int(next(x for x in open(f"/proc/{p}/status") if x.startswith("VmRSS:")).split()[1]) * 1024)
        except (OSError, StopIteration):
            pass
    return out


def test_workers_do_not_inherit_the_trainers_memory(shards):
    """A trainer that holds 1 GiB (a model, say) before its loader starts: the workers start from a fork
    server, not a fork of the trainer, so none of them holds that GiB."""
    import os

    ballast = torch.ones(256, 1024, 1024)  # 1 GiB, resident
    it = iter(TrainLoader(spec(shards, num_workers=2)))
    next(it)
    workers = _descendants_rss(os.getpid())
    assert workers and max(workers) < 0.7 * 2**30, [w / 2**20 for w in workers]
    del it, ballast


def _pids_below(pid: int) -> list[int]:
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def test_workers_leave_when_their_rank_is_killed(shards, tmp_path):
    """A rank killed outright (OOM, kill -9): its workers — children of the fork server, not of the rank —
    notice and leave, and the fork server with them; none lingers holding the job's output open."""
    import os
    import signal
    import subprocess
    import sys

    url = shards[0].url.rsplit("/", 1)[0] + "/manifest.json"
    script = (f"import os, time\n"
              f"from xtra_ds.data import TrainLoader, TrainSpec, resolve\n"
              f"it = iter(TrainLoader(TrainSpec(resolve({url!r}), global_batch=4, img_size=32, num_workers=2)))\n"
              f"next(it)\nprint('ready', flush=True)\ntime.sleep(600)\n")
    rank = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "ready"
    below = _pids_below(rank.pid)
    assert len(below) >= 3  # the fork server and two workers (and its resource tracker)
    os.kill(rank.pid, signal.SIGKILL)
    rank.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in below):
        time.sleep(0.2)
    alive = [p for p in below if os.path.exists(f"/proc/{p}")
             and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, [open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:100] for p in alive]


def _through_plain_webdataset(spec: str, options=None) -> dict[str, dict]:
    import webdataset as wds

    from xtra_ds.data import shard_urls, use_fsspec_in_webdataset
    from xtra_ds.data.samples import samples_of

    urls, duplicates = shard_urls(spec, options)
    use_fsspec_in_webdataset(options)
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    ours = {s["__key__"]: s for url in urls for s in samples_of(url, options)}  # the training loader's reader
    assert set(got) == set(ours) and all(got[k]["jpg"] == ours[k]["jpg"] and got[k]["json"] == ours[k]["json"]
                                         for k in got)
    return got, duplicates


@pytest.mark.parametrize("where", ["local", "s3"])
def test_shards_open_in_plain_webdataset(tmp_path, where, request):
    """What data_prep writes is plain WebDataset: wds.WebDataset over the manifest's shard URLs yields
    every sample the manifest counts, with the keys and bytes our loader reads."""
    import json as _json

    plain_corpus(tmp_path / "in", 23, size=(80, 60), classes=3)
    options, out = None, str(tmp_path / "out")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        options, out = s3["options"], f"s3://{s3['bucket']}/shards"
    assert shard_tool.main([str(tmp_path / "in"), "--output", out, "--shard-samples", "7", "--workers", "1",
                            "--min-side", "16", *(["--endpoint-url", options["endpoint_url"]] if options else [])]) == 0
    from xtra_ds.data.shards import read_manifest
    manifest = read_manifest(out + "/manifest.json", options)
    got, duplicates = _through_plain_webdataset(out + "/manifest.json", options)
    assert len(got) == sum(s["num_samples"] for s in manifest["shards"]) == 23 and not duplicates
    import hashlib
    for sample in got.values():  # the JPEGs were passed through: the bytes are the source's, as its json says
        assert hashlib.sha256(sample["jpg"]).hexdigest() == _json.loads(sample["json"])["sha256"]
        assert int(sample["cls"]) in (0, 1, 2)


def test_reused_batch_buffers_are_never_written_while_held(shards):
    """Two workers hand batches over through reused shared-memory slots, across epochs: every batch the
    consumer keeps stays as it arrived — it is the consumer's own copy, never a buffer a worker writes
    again — and equals a reference run's (copied on arrival there) pixel for pixel; and a worker waits
    for a slot still in use instead of writing into it."""
    import threading

    from xtra_ds.data.handover import BatchRing

    loader = TrainLoader(spec(shards, num_workers=2))
    n = 2 * loader.steps_per_epoch() + 3
    reference, it = [], iter(TrainLoader(spec(shards, num_workers=2)))
    for _ in range(n):
        b = next(it)
        reference.append((b["keys"], b["images"].clone()))
    kept = take(loader, n)  # every batch kept at once, for the whole run: many more than the slots there are
    assert len({b["images"].data_ptr() for b in kept}) == n
    for i, b in enumerate(kept):
        assert b["keys"] == reference[i][0] and torch.equal(b["images"], reference[i][1]), f"batch {i}"

    ring = BatchRing(2, (1, 2, 2, 3), torch.uint8)
    slots = [ring.acquire(), ring.acquire()]
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire()))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # every slot held: the worker side waits
    ring.release(slots[1])
    waiter.join(5)
    assert got == [slots[1]]


def test_a_reused_buffer_waits_for_its_device_copy():
    """A batch copied to the GPU from a page-locked buffer is still being read after the host has let go of it
    (``non_blocking``): the pool waits for the copy's event before it hands that buffer out again, and only for
    that buffer; a tensor the pool does not own is never fenced. (The CUDA side: tests/test_gpu.py.)"""
    from xtra_ds.data.handover import _FENCES, Buffers, fence

    class Copy:  # stands in for a recorded torch.cuda.Event
        def __init__(self):
            self.waited = 0

        def synchronize(self):
            self.waited += 1

    pool = Buffers((2, 4, 4, 3), torch.uint8)
    first = pool.get()
    ptr = first.untyped_storage().data_ptr()
    copy = Copy()
    fence(first, copy)
    del first  # the host is done with the batch; the device copy may not be
    second = pool.get()
    assert second.untyped_storage().data_ptr() == ptr and copy.waited == 1  # the same buffer, after the copy
    third = pool.get()  # the first is in use: a fresh one, nothing to wait for
    assert third.untyped_storage().data_ptr() != ptr and copy.waited == 1
    fence(torch.zeros(3), Copy())  # not a pooled buffer
    assert set(_FENCES) <= {b.untyped_storage().data_ptr() for b in pool.kept}
