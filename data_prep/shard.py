"""Shard an image corpus into WebDataset tars, locally or on object storage.

    python data_prep/shard.py /data/imagenet/train --output s3://bucket/in1k/train --name train
    python data_prep/shard.py /data/in21k/*.tar --output /scratch/in21k --workers 16
    python data_prep/shard.py urls.jsonl --output s3://bucket/web --num-jobs 64 --job-index 3
    python data_prep/shard.py --format cifar10 /data/cifar-10-batches-py --split test --output /shards/cifar10/test

Inputs: directory trees (class sub-folders give labels), .jsonl/.csv lists of paths or URLs,
tar archives (one per class); or, with ``--format``, one benchmark as distributed (its root folder and
``--split``: labels and class order are the benchmark's own, see data_prep/benchmarks).
Shards hold the inputs in a seeded shuffled order (``--shuffle-seed``,
``--no-shuffle``), so that a class-per-folder corpus does not become class-ordered shards; sample keys
stay the inputs' positions in the sorted list. Every input is either written or rejected with a reason; a rerun
skips finished shards and redoes partial ones. In a job array (``--num-jobs``/``--job-index``,
default from SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID) each job writes its own shards; run
``data_prep/finalize.py`` once all are done. A single job finalizes by itself.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, replace

from tqdm import tqdm

from data_prep import __version__
from data_prep.benchmarks import FORMATS, list_benchmark
from data_prep.cli import add_storage_args, fail, parse_size, storage_options
from data_prep.finalize import finalize_and_report
from data_prep.imaging import Settings
from data_prep.manifest import agree_on_plan, fingerprint, input_order, order_fingerprint, plan_shards, settings_hash
from data_prep.sources import SourcePolicy, class_map, list_inputs
from data_prep.storage import StorageError, check_writable, url_to_fs
from data_prep.worker import ShardTask, init_worker, run_task, shard_failure, write_shard
from xtra_ds.data.format import FORMAT_VERSION, join, pil_info, shard_name, stats_name
from xtra_ds.storage import is_local, mask_secrets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xtra-shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+",
                        help="directories, .jsonl/.csv lists, .tar archives (local or URLs, globs allowed); with "
                             "--format, the benchmark's root folder")
    parser.add_argument("--format", choices=sorted(FORMATS), default=None,
                        help="read INPUT as this benchmark as distributed (its index files give the labels and the "
                             "class order; docs/DATA_PREP.md lists each layout)")
    parser.add_argument("--split", default=None,
                        help="with --format: the split to shard (e.g. train, test; 'a+b' for both, e.g. train1+val1)")
    add_storage_args(parser)
    parser.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar (default: shard)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes on this machine (default: all cores)")
    parser.add_argument("--num-jobs", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                        help="machines in the job array (default $SLURM_ARRAY_TASK_COUNT or 1)")
    parser.add_argument("--job-index", type=int, default=None,
                        help="this machine's index, 0-based "
                             "(default $SLURM_ARRAY_TASK_ID minus $SLURM_ARRAY_TASK_MIN, or 0)")
    parser.add_argument("--shard-samples", type=int, default=10_000,
                        help="at most this many inputs per shard (default 10000)")
    parser.add_argument("--shard-size", default="256MB", help="target shard size, by input bytes (default 256MB)")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the order the shards hold the inputs in (default 0); the training loader's "
                             "streams read contiguous stretches of it, so a sorted, class-ordered corpus must not "
                             "stay sorted")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the sorted input order in the shards (class-ordered for class folders)")
    parser.add_argument("--max-side", type=int, default=Settings.max_side,
                        help=f"resize so the shorter side is at most this (0 = keep; default {Settings.max_side})")
    parser.add_argument("--quality", type=int, default=Settings.quality, help="JPEG quality of re-encoded images")
    parser.add_argument("--min-side", type=int, default=None,
                        help=f"reject images with a shorter side below this (default {Settings.min_side}; 0 for "
                             f"benchmarks stored as arrays, e.g. CIFAR's 32 px)")
    parser.add_argument("--max-pixels", type=int, default=Settings.max_pixels,
                        help="reject images with more pixels (bombs)")
    parser.add_argument("--max-bytes", default=str(Settings.max_bytes), help="reject larger files unread (e.g. 64MB)")
    parser.add_argument("--no-passthrough", action="store_true",
                        help="re-encode every image, even JPEGs that need no change")
    parser.add_argument("--labels", choices=["auto", "dirs", "none"], default="auto",
                        help="auto: class sub-folders / per-class tars / list 'label' field give labels")
    parser.add_argument("--allow-sources", action="append", default=[], metavar="SCHEME[://HOST]",
                        help="what entries of .jsonl/.csv lists may reach (repeatable), e.g. https or "
                             "https://images.example.org; default: each list's own scheme. Addresses that are not "
                             "globally routable (metadata, loopback, private) only when named with their host")
    parser.add_argument("--dry-run", action="store_true", help="list inputs and plan shards; write nothing")
    parser.add_argument("--no-finalize", action="store_true", help="a single job does not write manifest.json")
    args = parser.parse_args(argv)
    if args.job_index is None:
        args.job_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    if not 0 <= args.job_index < args.num_jobs:
        parser.error(f"--job-index {args.job_index} is outside 0..{args.num_jobs - 1} (--num-jobs {args.num_jobs})")
    if args.workers < 1 or args.shard_samples < 1:
        parser.error("--workers and --shard-samples must be ≥ 1")
    if args.shuffle_seed < 0:
        parser.error("--shuffle-seed must be ≥ 0")
    if args.format and (len(args.inputs) != 1 or not args.split):
        splits = FORMATS[args.format].splits
        parser.error(f"--format {args.format} takes one input, the benchmark's root folder, and --split "
                     f"({', '.join(splits[:6])}{', …' if len(splits) > 6 else ''})")
    if args.split and not args.format:
        parser.error("--split goes with --format (a benchmark as distributed)")
    if args.format and args.labels != "auto":
        parser.error("--labels does not apply to --format: the benchmark's index files give the labels")
    return args


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        opts = storage_options(args)
        settings = Settings(max_side=args.max_side, quality=args.quality, max_pixels=args.max_pixels,
                            max_bytes=parse_size(args.max_bytes), passthrough=not args.no_passthrough)
        if args.format:  # lossless images, every listed image kept, array images never too small
            settings = replace(settings, **FORMATS[args.format].settings())
        if args.min_side is not None:
            settings = replace(settings, min_side=args.min_side)
        fs, root = url_to_fs(args.output, opts)
        if not args.dry_run:
            check_writable(fs, root, args.output)
        print(f"imaging library: {pil_info()}; listing inputs: {', '.join(args.inputs)}"
              + (f" ({args.format}, split {args.split})" if args.format else ""), flush=True)
        policy = SourcePolicy(tuple(args.allow_sources))
        benchmark = list_benchmark(args.format, args.inputs[0], args.split, opts) if args.format else None
        items = benchmark.items if benchmark else list_inputs(args.inputs, opts, args.labels, policy)
        if not items:
            fail(f"no input files found in {', '.join(args.inputs)}")
        refused = Counter(it.refused.split(";")[0] for it in items if it.refused)
        for why, n in refused.most_common(5):
            print(f"warning: {n} list entr{'y' if n == 1 else 'ies'} will not be read (rejected as not_allowed): {why}",
                  file=sys.stderr)
        classes = class_map(items, benchmark.classes if benchmark else None)  # a benchmark's own label order
        seed = None if args.no_shuffle else args.shuffle_seed
        order = input_order(len(items), seed)
        starts = plan_shards([items[i].size for i in order], args.shard_samples, parse_size(args.shard_size))
        # all three decide the shards' bytes
        sdict = {**asdict(settings), "allow_sources": sorted(args.allow_sources), "shuffle_seed": seed}
        plan = {"format": FORMAT_VERSION, "tool_version": __version__, "name": args.name, "sources": args.inputs,
                "settings": sdict, "settings_hash": settings_hash(sdict), "num_inputs": len(items),
                "inputs_fingerprint": fingerprint([it.source for it in items]),
                "order_fingerprint": order_fingerprint(order), "shard_starts": starts,
                "classes": classes, "num_jobs": args.num_jobs,
                **({"benchmark": benchmark.details} if benchmark else {})}
        mine = [i for i in range(len(starts)) if i % args.num_jobs == args.job_index]
        ends = starts[1:] + [len(items)]
        if args.dry_run:
            n_mine = sum(ends[i] - starts[i] for i in mine)
            print(f"dry run: {len(items)} inputs ({human(sum(it.size for it in items))}), {len(classes)} classes, "
                  f"{len(starts)} shards in all; job {args.job_index}/{args.num_jobs} would write {len(mine)} shards "
                  f"({n_mine} inputs) to {args.output} as {args.name}-NNNNNN.tar with {args.workers} workers; "
                  + ("inputs in sorted order (--no-shuffle)" if seed is None else f"inputs shuffled (seed {seed})"))
            print(f"settings: {sdict}" + (f"; storage options: {mask_secrets(opts)}" if opts else ""))
            return 0
        agree_on_plan(fs, root, args.output, plan)
        fs.invalidate_cache(root)
        existing = set(os.path.basename(p) for p in fs.ls(root, detail=False))
        done, todo = [], []
        for i in mine:
            if stats_name(args.name, i) in existing and shard_name(args.name, i) in existing:
                done.append(i)
            else:
                inputs = order[starts[i]:ends[i]].tolist()
                todo.append(ShardTask(i, inputs, [items[j] for j in inputs], args.output, args.name, settings,
                                      plan["settings_hash"], classes, opts, policy))
        if is_local(fs):  # staging files of our shards left by a killed run
            for f in existing:
                ours = any(f.startswith("." + shard_name(args.name, t.index)) for t in todo)
                if ours and f.startswith(".") and f.endswith(".tmp"):
                    fs.rm_file(join(root, f))
    except StorageError as e:
        fail(str(e))
    total = sum(len(t.items) for t in todo)
    print(f"job {args.job_index}/{args.num_jobs}: {len(mine)} shards, {len(done)} already complete, "
          f"{len(todo)} to write "
          f"({total} inputs) with {min(args.workers, max(1, len(todo)))} workers → {args.output}", flush=True)
    results, failures = run(todo, args.workers, total)
    return summarize(args, fs, root, results, failures, len(done), time.time() - t0)


def run(todo: list[ShardTask], workers: int, total: int):
    results, failures = [], []
    bar = tqdm(total=total, unit="img", dynamic_ncols=True, smoothing=0.1, disable=total == 0)
    if workers == 1 or len(todo) <= 1:
        from data_prep.worker import Progress

        class Inline(Progress):
            def __init__(self):
                super().__init__()
                self.rej = 0

            def add(self, rejected):
                self.rej += rejected
                bar.update(1)
                bar.set_postfix(rejected=self.rej, refresh=False)

        prog = Inline()
        for t in todo:
            try:
                results.append(write_shard(t, prog))
            except Exception as e:
                failures.append({"index": t.index, "error": shard_failure(t, e)})
    else:
        ctx = mp.get_context("spawn")  # fsspec/s3fs event loops are not fork-safe
        done_v, rej_v = ctx.Value("q", 0), ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(todo)), initializer=init_worker, initargs=(done_v, rej_v)) as pool:
            pending = [pool.apply_async(run_task, (t,)) for t in todo]
            while pending:
                time.sleep(0.2)
                bar.n = done_v.value
                bar.set_postfix(rejected=rej_v.value, refresh=False)
                bar.refresh()
                for r in [r for r in pending if r.ready()]:
                    pending.remove(r)
                    out = r.get()
                    (failures if "error" in out else results).append(out)
            bar.n = done_v.value
    bar.close()
    return results, failures


def summarize(args, fs, root, results, failures, n_done, seconds) -> int:
    written = sum(r["num_samples"] for r in results)
    reasons = Counter(x["reason"] for r in results for x in r["rejected"])
    inputs = sum(r["num_inputs"] for r in results)
    print(f"\n  written   {written} samples in {len(results)} shards ({human(sum(r['bytes'] for r in results))})"
          + (f"; {n_done} shards were already complete" if n_done else ""))
    print(f"  rejected  {sum(reasons.values())}" + (": " + ", ".join(f"{k} {v}" for k,
                                                                     v in reasons.most_common()) if reasons else ""))
    print(f"  time      {seconds:.1f} s ({inputs / max(seconds, 1e-9):.1f} inputs/s)")
    if failures:
        for f in failures:
            print(f"  FAILED    {shard_name(args.name, f['index'])}: {f['error']}", file=sys.stderr)
        print(f"error: {len(failures)} shard(s) failed; rerun the same command to retry them "
              f"(finished shards are skipped)", file=sys.stderr)
        return 1
    if args.num_jobs == 1 and not args.no_finalize:
        print("  manifest", end="  ")
        finalize_and_report(args.output, storage_options(args))
    else:
        print(f"  next      when every job is done: python data_prep/finalize.py --output {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
