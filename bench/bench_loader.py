"""Training-pipeline throughput: the loader vs a bare decode+crop+flip loop on the same bytes.

    .venv/bin/python bench/bench_loader.py            # shards bench/.corpus once into bench/.shards

Measured in one run, --rounds alternating rounds, one epoch of 1000 ImageNet-like JPEGs (500×375)
each, 224-px RandomResizedCrop(0.3–1, 0.75–1.5, bicubic) + flip. Each ratio is taken within a round
(the loader against the bare loop measured just before it) and the median over rounds is printed,
with the range: the machine is shared and its speed drifts between rounds.

* bare: one process, ``decode_train`` on bytes already in memory (no I/O, no tar, no batching);
* loader, local shards, 1 and 2 worker processes (uint8 batches of 32);
* loader, 1 worker, from a moto S3 server on loopback (in this process's threads);
* loader, 1 worker, normalising to float32 in the worker instead of uint8 out;
* bare with JPEG draft mode off, to show what draft buys.

Besides images/s, the CPU efficiency: the bare loop's CPU seconds per image over the pipeline's
(its worker processes, their reader threads and the consuming process together), which the
machine's drifting speed moves far less than wall-clock rates. 1.00 = nothing spent beyond the
decoding itself.

    .venv/bin/python bench/bench_loader.py --epoch-boundary   # only the epoch-boundary stall

``--epoch-boundary``: the data wait of the first step of each epoch against the mid-epoch steps of
the same run, in the CPU demo's setting (the digits corpus ``make demo`` trains on, 64 px, rank 0
of 2 with 16 images per step, 1 worker, shuffle buffer 256: ``ds_configs/tiny_cpu.yaml``), with a
busy loop of ``--step-s`` seconds standing in for the training step (the demo's is ≈0.35 s).
"""

from __future__ import annotations

from _common import alternate, median_range, ratios

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from xtra_ds.data import TrainLoader, TrainSpec, resolve
from xtra_ds.data.format import pil_info
from xtra_ds.data.transforms import decode_train

SIZE, SCALE, RATIO = 224, (0.3, 1.0), (0.75, 1.5)


def ensure_shards(here: Path) -> Path:
    out = here / ".shards"
    if not (out / "manifest.json").exists():
        import bench_shard

        from data_prep import shard as shard_tool

        corpus = here / ".corpus"
        if len(list(corpus.glob("*.jpg"))) != 1000:
            bench_shard.make_corpus(corpus, 1000)
        assert shard_tool.main([str(corpus), "--output", str(out), "--shard-samples", "100", "--workers", "2"]) == 0
    return out


def images_in(shards_dir: Path) -> list[bytes]:
    from xtra_ds.data.samples import samples_of

    return [s["jpg"] for tar in sorted(shards_dir.glob("*.tar")) for s in samples_of(str(tar), None)]


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time of each process (all its threads) still there, from /proc."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]),
                                    []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], list(children.get(pid, []))
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def bare(images: list[bytes], draft: bool = True) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of the bare loop."""
    rng = random.Random(0)
    t, c = time.perf_counter(), time.process_time()
    for data in images:
        decode_train(data, SIZE, SCALE, RATIO, 0.5, rng, draft)
    return len(images) / (time.perf_counter() - t), (time.process_time() - c) / len(images)


def loader(shards, workers: int, options=None, normalize=False) -> tuple[float, float]:
    """(images/s, CPU seconds per image of the workers and the consumer together)."""
    spec = TrainSpec(shards, global_batch=32, img_size=SIZE, num_workers=workers, storage_options=options,
                     normalize_in_worker=normalize, shuffle=500)
    ld = TrainLoader(spec)
    n = ld.steps_per_epoch()
    it = iter(ld)
    first = next(it)  # worker start-up is not throughput
    procs = descendants(os.getpid()) if workers else []  # the workers (and the idle fork server)
    t, c0, w0 = time.perf_counter(), time.process_time(), cpu_seconds(procs)
    w1 = dict(w0)
    for _ in range(n - 1):
        next(it)
        w1.update(cpu_seconds(procs))  # after every step: a worker that is done exits before the last
    images = (n - 1) * len(first["keys"])
    dt = time.perf_counter() - t
    cpu = time.process_time() - c0 + sum(w1[p] - w0[p] for p in w1 if p in w0)
    return images / dt, cpu / images


def busy(seconds: float) -> None:
    """One core busy for ``seconds`` (a training step's compute, in this process only)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def epoch_boundary(manifest: str, epochs: int, step_s: float) -> None:
    """The data wait of each step over ``epochs`` epochs of the demo's setting; printed: the first step of every
    epoch after the first (the first is the workers' start) against the median mid-epoch step."""
    spec = TrainSpec(resolve(manifest), global_batch=32, img_size=64, rank=0, world_size=2, num_workers=1,
                     shuffle=256, seed=0)
    loader = TrainLoader(spec)
    steps = [loader.steps_per_epoch(e) for e in range(epochs)]
    it = iter(loader)
    waits: dict[tuple[int, int], float] = {}
    for _ in range(sum(steps)):
        b = next(it)
        waits[b["epoch"], b["step"]] = loader.last_wait
        busy(step_s)
    mid = statistics.median(w for (e, s), w in waits.items() if 2 <= s < steps[e] - 1)
    firsts = [waits[e, 0] for e in range(1, epochs)]
    print(f"{os.cpu_count()} cores; {steps} steps per epoch of {spec.share} images, 64 px, 1 worker, "
          f"training step {step_s:.2f} s (busy loop)")
    print(f"first step of the run (workers start): wait {waits[0, 0] * 1e3:8.1f} ms")
    for e, w in enumerate(firsts, 1):
        print(f"first step of epoch {e}:               wait {w * 1e3:8.1f} ms = {w / (w + step_s):6.1%} of the step")
    print(f"mid-epoch step (median):              wait {mid * 1e3:8.1f} ms = {mid / (mid + step_s):6.1%} of the step")
    print(f"epoch's first step / mid-epoch step:  {statistics.median(firsts) / mid:.1f} (median over boundaries)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epoch-boundary", action="store_true", help="measure only the stall at epoch boundaries")
    parser.add_argument("--epochs", type=int, default=5, help="with --epoch-boundary")
    parser.add_argument("--step-s", type=float, default=0.35, help="with --epoch-boundary: the training step")
    args = parser.parse_args()
    if args.epoch_boundary:
        import tempfile

        from data_prep.demo_corpus import digits_shards

        with tempfile.TemporaryDirectory() as tmp:
            manifest, _ = digits_shards(Path(tmp, "img"), Path(tmp, "shards"))
            epoch_boundary(manifest, args.epochs, args.step_s)
        return
    here = Path(__file__).resolve().parent
    out = ensure_shards(here)
    images = images_in(out)
    local = resolve(str(out / "manifest.json"))

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=51234, verbose=False)
    server.start()
    endpoint = "http://127.0.0.1:51234"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
    for f in out.iterdir():
        if f.suffix in (".tar", ".json"):
            fs.put_file(str(f), f"bench/shards/{f.name}")
    options = {"endpoint_url": endpoint}
    remote = resolve("s3://bench/shards/manifest.json", options)

    print(f"{pil_info()}; {len(images)} JPEGs, {SIZE}px crops; {os.cpu_count()} cores")
    measured = alternate({"bare": lambda: bare(images), "local1": lambda: loader(local, 1),
                          "s3_1": lambda: loader(remote, 1, options), "local2": lambda: loader(local, 2),
                          "float1": lambda: loader(local, 1, normalize=True),
                          "bare_nodraft": lambda: bare(images, draft=False)}, args.rounds)
    server.stop()
    runs = {k: [ips for ips, _ in v] for k, v in measured.items()}
    cpu = {k: [per_image for _, per_image in v] for k, v in measured.items()}

    def ratio(a, b, per=1.0):
        return median_range(ratios(runs[a], runs[b], per))

    def cpu_ratio(a):  # the bare loop's CPU per image over this pipeline's: 1 = no CPU spent beyond decoding
        return f"{statistics.median(ratios(cpu['bare'], cpu[a])):.2f}"

    m = {k: statistics.median(v) for k, v in runs.items()}
    print(f"bare loop (draft on)          {m['bare']:8.1f} img/s")
    print(f"bare loop (draft off)         {m['bare_nodraft']:8.1f} img/s   "
          f"draft speed-up {ratio('bare', 'bare_nodraft')}")
    print(f"loader, local, 1 worker       {m['local1']:8.1f} img/s   vs bare {ratio('local1', 'bare')}; "
          f"CPU efficiency {cpu_ratio('local1')}")
    print(f"loader, local, 2 workers      {m['local2']:8.1f} img/s   per worker vs bare {ratio('local2', 'bare', 2)}; "
          f"CPU efficiency {cpu_ratio('local2')}")
    print(f"loader, S3 loopback, 1 worker {m['s3_1']:8.1f} img/s   vs local {ratio('s3_1', 'local1')}")
    print(f"loader, float32 out, 1 worker {m['float1']:8.1f} img/s   vs uint8 out {ratio('float1', 'local1')}")


if __name__ == "__main__":
    main()
