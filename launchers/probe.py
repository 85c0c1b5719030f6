"""The paper's full probing protocol on one encoder, offline; prints a results table.

    python launchers/probe.py runs/b16/exports/step_00500000 \\
        --train s3://bucket/in1k/train/manifest.json --val s3://bucket/in1k/val/manifest.json
    python launchers/probe.py xtra_vit_huge_patch14.ckpt --model xtra_vit_huge_patch14 --train … --val …

The encoder: an export folder, a ZeRO checkpoint folder of a run, or a weights file (official
XTRA checkpoint, consolidated state dict, encoder safetensors; then --model is required).
Defaults are the paper's: 100 epochs, AdamW, cosine to 1e-5, lr sweep {1e-4 … 4e-3}, clip 3.0,
linear and attentive probes. See docs/EVAL.md for what differs from the paper's augmentations.
"""

import argparse
import json
import logging
import sys

from xtra_ds.eval.device import pick_device
from xtra_ds.eval.encoder import ExportError, load_encoder
from xtra_ds.eval.protocol import PAPER_LRS, Protocol, run_protocol, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("encoder", help="export folder, ZeRO checkpoint folder, or weights file")
    parser.add_argument("--train", required=True, help="labelled training shards (data_prep manifest)")
    parser.add_argument("--val", required=True, help="labelled validation shards")
    parser.add_argument("--model", default="", help="model name for a weights file, e.g. xtra_vit_huge_patch14")
    parser.add_argument("--img-size", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=0)
    parser.add_argument("--probes", default="linear,attentive")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lrs", default=",".join(f"{x:g}" for x in PAPER_LRS))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--bidirectional", action="store_true", help="extract features without the block-causal mask")
    parser.add_argument("--workers", type=int, default=4, help="data loader processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [probe] %(message)s", datefmt="%H:%M:%S")
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    over = {k: v for k, v in (("img_size", args.img_size), ("block_size", args.block_size)) if v}
    try:
        device = pick_device(args.device)
        encoder, meta = load_encoder(args.encoder, model=args.model, storage_options=opts, **over)
        proto = Protocol(probes=tuple(args.probes.split(",")), epochs=args.epochs,
                         lrs=[float(x) for x in args.lrs.split(",")],
                         batch_size=args.batch_size, weight_decay=args.weight_decay, causal=not args.bidirectional,
                         num_workers=args.workers)
        res = run_protocol(encoder, args.train, args.val, proto, device=device, storage_options=opts)
    except (ExportError, ValueError, FileNotFoundError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
