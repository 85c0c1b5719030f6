"""Training-pipeline throughput: the loader vs a bare decode+crop+flip loop on the same bytes.

    .venv/bin/python bench/bench_loader.py            # shards bench/.corpus once into bench/.shards

Measured in one run, median of --rounds alternating rounds, one epoch of 1000 ImageNet-like
JPEGs (500×375) each, 224-px RandomResizedCrop(0.3–1, 0.75–1.5, bicubic) + flip:

* bare: one process, ``decode_train`` on bytes already in memory (no I/O, no tar, no batching);
* loader, local shards, 1 and 2 worker processes (uint8 batches of 32);
* loader, 1 worker, from a moto S3 server on loopback (in this process's threads);
* loader, 1 worker, normalising to float32 in the worker instead of uint8 out;
* bare with JPEG draft mode off, to show what draft buys.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xtra_ds.data import TrainLoader, TrainSpec, resolve  # noqa: E402
from xtra_ds.data.format import pil_info  # noqa: E402
from xtra_ds.data.transforms import decode_train  # noqa: E402

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
    out = []
    for tar in sorted(shards_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            out += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return out


def bare(images: list[bytes], draft: bool = True) -> float:
    rng = random.Random(0)
    t = time.perf_counter()
    for data in images:
        decode_train(data, SIZE, SCALE, RATIO, 0.5, rng, draft)
    return len(images) / (time.perf_counter() - t)


def loader(shards, workers: int, options=None, normalize=False) -> float:
    spec = TrainSpec(shards, batch_size=32, img_size=SIZE, num_workers=workers, storage_options=options,
                     normalize_in_worker=normalize, shuffle=500)
    ld = TrainLoader(spec)
    n = ld.batches_per_epoch()
    it = iter(ld)
    first = next(it)  # worker start-up is not throughput
    t = time.perf_counter()
    for _ in range(n - 1):
        next(it)
    return (n - 1) * len(first["keys"]) / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    here = Path(__file__).resolve().parent
    out = ensure_shards(here)
    images = images_in(out)
    local = resolve(str(out / "manifest.json"))

    import os

    import boto3
    import fsspec
    from moto.server import ThreadedMotoServer
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
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
    runs = {k: [] for k in ("bare", "bare_nodraft", "local1", "local2", "s3_1", "float1")}
    for _ in range(a.rounds):
        runs["bare"].append(bare(images))
        runs["local1"].append(loader(local, 1))
        runs["s3_1"].append(loader(remote, 1, options))
        runs["local2"].append(loader(local, 2))
        runs["float1"].append(loader(local, 1, normalize=True))
        runs["bare_nodraft"].append(bare(images, draft=False))
    server.stop()
    m = {k: statistics.median(v) for k, v in runs.items()}
    b = m["bare"]
    print(f"bare loop (draft on)          {b:8.1f} img/s")
    print(f"bare loop (draft off)         {m['bare_nodraft']:8.1f} img/s   draft speed-up {b / m['bare_nodraft']:.2f}x")
    print(f"loader, local, 1 worker       {m['local1']:8.1f} img/s   ratio vs bare {m['local1'] / b:.2f}")
    print(f"loader, local, 2 workers      {m['local2']:8.1f} img/s   per worker {m['local2'] / 2:.1f} "
          f"({m['local2'] / 2 / b:.2f} of bare)")
    print(f"loader, S3 loopback, 1 worker {m['s3_1']:8.1f} img/s   vs local {m['s3_1'] / m['local1']:.2f}")
    print(f"loader, float32 out, 1 worker {m['float1']:8.1f} img/s   vs uint8 out {m['float1'] / m['local1']:.2f}; "
          f"batch bytes 4x")


if __name__ == "__main__":
    main()
