"""Forward+backward throughput of the XTRA model vs a straightforward raster-order version.

Both run the same math with the same weights on the same batch: ours (block-major tokens,
one precomputed mask, reshape-based block gathering) and the plain raster-order oracle
(``xtra_ds.models.raster_reference``: masked softmax attention on raster tokens, F.unfold
block gathering). Timings alternate between the two so machine noise hits both alike; the
ratio (ours / raster) is the figure to read.

    .venv/bin/python bench/bench_model.py                 # tiny and B/16
    .venv/bin/python bench/bench_model.py --models tiny --rounds 5
"""

from __future__ import annotations

from _common import alternate, timed

import argparse
import statistics
from functools import partial

import torch

from xtra_ds.models import create_model
from xtra_ds.models.raster_reference import raster_loss
from xtra_ds.objective import NextBlockLoss

MODELS = {"tiny": ("xtra_vit_tiny_patch16", 8), "base": ("xtra_vit_base_patch16", 2)}


def step_ours(model, loss_fn, x):
    out = model(x)
    loss_fn(out.preds, out.targets).backward()


def step_raster(model, sd, x):
    raster_loss(sd, model.sizes, x).backward()


def timed_from_zero_grads(step, model, *args) -> float:
    """Seconds of one ``step(model, *args)``, the model's gradients dropped first."""
    model.zero_grad(set_to_none=True)
    return timed(step, model, *args)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per implementation (after one warm-up)")
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<24}{'batch':>6}{'ours img/s':>12}{'raster img/s':>14}{'ratio':>8}")
    for key in a.models:
        name, batch = MODELS[key]
        model = create_model(name)
        sd = dict(model.named_parameters())  # the oracle runs on the very same parameters
        x = torch.randn(batch, 3, model.sizes.img_size, model.sizes.img_size)
        loss_fn = NextBlockLoss()
        step_ours(model, loss_fn, x)  # warm-up
        step_raster(model, sd, x)
        runs = alternate({"ours": partial(timed_from_zero_grads, step_ours, model, loss_fn, x),
                          "raster": partial(timed_from_zero_grads, step_raster, model, sd, x)}, a.rounds)
        o, r = batch / statistics.median(runs["ours"]), batch / statistics.median(runs["raster"])
        print(f"{name:<24}{batch:>6}{o:>12.2f}{r:>14.2f}{o / r:>8.2f}")


if __name__ == "__main__":
    main()
