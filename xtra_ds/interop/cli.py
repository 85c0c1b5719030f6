"""``xtra-convert``: check that an official checkpoint loads; export its encoder for timm.

    xtra-convert load  CKPT  --model xtra_vit_huge_patch14            # check an official file
    xtra-convert timm  CKPT  --model xtra_vit_huge_patch14 -o enc.safetensors
"""

from __future__ import annotations

import argparse
import sys

from ..models.xtra import create_model
from .official import CheckpointError, encoder_from_any, export_encoder, load_state_dict_checked, read_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtra-convert",
                                     description="Load official XTRA checkpoints; export encoders for timm.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("load", "check that a checkpoint loads into the model"),
                        ("timm", "export the encoder as safetensors in timm's ViT key layout")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("checkpoint",
                         help="*.ckpt (Lightning), mp_rank_00_model_states.pt (DeepSpeed), .pt or .safetensors")
        cmd.add_argument("--model", required=True, help="e.g. xtra_vit_huge_patch14")
        cmd.add_argument("--img-size", type=int, default=0)
        cmd.add_argument("--block-size", type=int, default=4)
        if name == "timm":
            cmd.add_argument("-o", "--output", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    over = {"block_size": args.block_size} | ({"img_size": args.img_size} if args.img_size else {})
    try:
        model = create_model(args.model, **over)
        state = read_checkpoint(args.checkpoint)
        if args.cmd == "load":
            load_state_dict_checked(model, state, args.checkpoint)
            n = sum(v.numel() for v in model.state_dict().values())
            print(f"ok: {args.checkpoint} loads into {args.model} ({n:,} parameters)")
        else:
            load_state_dict_checked(model.enc, encoder_from_any(state), args.checkpoint)
            export_encoder(model.enc, args.output, {"source": str(args.checkpoint), "model": args.model})
            print(f"wrote {args.output} (timm VisionTransformer layout, {len(model.enc.state_dict())} tensors)")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
