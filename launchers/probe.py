"""The paper's full probing protocol on one encoder, offline; prints a results table.

    python launchers/probe.py runs/b16/exports/step_00500000 \\
        --train s3://bucket/in1k/train/manifest.json --val s3://bucket/in1k/val/manifest.json
    python launchers/probe.py xtra_vit_huge_patch14.ckpt --model xtra_vit_huge_patch14 --train … --val …
    python launchers/probe.py runs/h14/exports/step_00629900 --suite ds_configs/eval/paper15.yaml \\
        --suite-root s3://bucket/benchmarks --out results/h14      # every benchmark, and their mean

With --suite, every dataset of the suite file (or those of --only) is probed with the suite's settings for it
(the official learning-rate sweep, batch size, warm-up), and the table comes in the paper's layout — one column
per benchmark and the average — printed and, with --out, written as OUT.json and OUT.md.

The encoder: an export folder, a ZeRO checkpoint folder of a run, or a weights file (official
XTRA checkpoint, consolidated state dict, encoder safetensors; then --model is required).
Defaults are the paper's: 100 epochs, AdamW, cosine to 1e-5, lr sweep {1e-4 … 4e-3}, clip 3.0,
linear and attentive probes. See docs/EVAL.md for what differs from the paper's augmentations.
"""

import argparse
import json
import logging
import sys
from dataclasses import replace

from xtra_ds.config import ConfigError
from xtra_ds.eval.device import pick_device
from xtra_ds.eval.encoder import ExportError, load_encoder
from xtra_ds.eval.protocol import PAPER_LRS, Protocol, run_protocol, run_suite, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", help="export folder, ZeRO checkpoint folder, or weights file")
    parser.add_argument("--train", help="labelled training shards (data_prep manifest)")
    parser.add_argument("--val", help="labelled validation shards")
    parser.add_argument("--suite", help="a suite file (ds_configs/eval/paper15.yaml) instead of --train/--val")
    parser.add_argument("--suite-root", default="", help="where the suite's relative paths start")
    parser.add_argument("--only", default="", help="comma-separated datasets of the suite to probe")
    parser.add_argument("--model", default="", help="model name for a weights file, e.g. xtra_vit_huge_patch14")
    parser.add_argument("--img-size", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=0)
    parser.add_argument("--probes", help="comma-separated (default linear,attentive; a suite's own with --suite)")
    parser.add_argument("--epochs", type=int, help="default 100 (or the suite's)")
    parser.add_argument("--lrs", help=f"comma-separated (default {','.join(f'{x:g}' for x in PAPER_LRS)}, or the "
                                      f"suite's sweep per dataset)")
    parser.add_argument("--batch-size", type=int, help="default 1024 (or the suite's per dataset)")
    parser.add_argument("--weight-decay", type=float, help="default 0.05 (or the suite's)")
    parser.add_argument("--bidirectional", action="store_true", help="extract features without the block-causal mask")
    parser.add_argument("--workers", type=int, default=4, help="data loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    if not args.suite and not (args.train and args.val):
        parser.error("give --train and --val, or --suite")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [probe] %(message)s", datefmt="%H:%M:%S")
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    over = {k: v for k, v in (("img_size", args.img_size), ("block_size", args.block_size)) if v}
    given = {k: v for k, v in (("probes", args.probes and tuple(args.probes.split(","))), ("epochs", args.epochs),
                               ("lrs", args.lrs and [float(x) for x in args.lrs.split(",")]),
                               ("batch_size", args.batch_size), ("weight_decay", args.weight_decay)) if v}
    base = Protocol(causal=not args.bidirectional, num_workers=args.workers)
    try:
        device = pick_device(args.device)
        encoder, meta = load_encoder(args.encoder, model=args.model, storage_options=opts, **over)
        if args.suite:
            return suite(args, encoder, meta, base, given, device, opts)
        res = run_protocol(encoder, args.train, args.val, replace(base, **given), device=device, storage_options=opts)
    except (ExportError, ValueError, FileNotFoundError, ConfigError) as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    res |= {"encoder": args.encoder, "model": meta.model, "step": meta.step or None, "device": str(device)}
    print(f"\n{args.encoder}: {res['epochs']} epochs, {res['val_images']} val images, {res['seconds']:.0f} s")
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"results: {args.out}")
    return 0


def suite(args, encoder, meta, base: Protocol, given: dict, device, opts) -> int:
    """Every dataset of the suite (or of --only), then the table in the paper's layout."""
    from xtra_ds.config.schema import EvalConfig
    from xtra_ds.eval.suite import markdown, suite_of

    spec = suite_of(EvalConfig(suite=args.suite, suite_root=args.suite_root))
    datasets = spec.only([n for n in args.only.split(",") if n])
    results, summary = run_suite(encoder, spec, datasets, base, given, device=device, storage_options=opts)
    for name, res in results.items():
        print(f"\n{name}: {res['epochs']} epochs, {res['val_images']} val images, {res['seconds']:.0f} s")
        print(table(res))
    summary |= {"encoder": args.encoder, "model": meta.model, "step": meta.step or None, "per_dataset": results}
    text = markdown(summary, f"{args.encoder} on suite {spec.name}")
    print("\n" + text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(summary, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
        print(f"results: {args.out}.json, {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
