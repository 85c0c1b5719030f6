"""A few minutes of XTRA pre-training on real photographs, on the CPU, in one process.

Builds the ``tiny_cpu`` recipe's model, trains it on random crops of the photographs that
scikit-image ships (astronaut, coffee, rocket, …), and reports the loss drop and throughput.
The distributed pipeline (data_prep shards → DeepSpeed ranks → eval worker) is
``launchers/pretrain.py``; this demo shows the model and objective at work on one core set.

    .venv/bin/python launchers/demo.py [--config ds_configs/tiny_cpu.yaml] [--steps 60] [key=value ...]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from xtra_ds.config import ConfigError, load_config, save_config
from xtra_ds.engine.schedule import lr_at, param_groups
from xtra_ds.models.build import build_model
from xtra_ds.objective import NextBlockLoss
from xtra_ds.utils import pil_info

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "moon", "coins", "clock"]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_photos() -> list[torch.Tensor]:
    """scikit-image's sample photographs as normalised float tensors [3, H, W]."""
    import skimage.data

    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(skimage.data, name)())
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        t = torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).float() / 255
        out.append((t - MEAN) / STD)
    return out


def random_crops(photos, n: int, size: int, scale, ratio, g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (area ``scale``, aspect ``ratio``) + horizontal flip, as in the paper."""
    batch = []
    for _ in range(n):
        img = photos[int(torch.randint(len(photos), (1,), generator=g))]
        _, H, W = img.shape
        area = H * W * float(torch.empty(1).uniform_(*scale, generator=g))
        r = math.exp(float(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)))
        w = min(W, int(round(math.sqrt(area * r))))
        h = min(H, int(round(math.sqrt(area / r))))
        y = int(torch.randint(H - h + 1, (1,), generator=g))
        x = int(torch.randint(W - w + 1, (1,), generator=g))
        crop = F.interpolate(img[None, :, y:y + h, x:x + w], size=(size, size), mode="bicubic", align_corners=False)
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        batch.append(crop[0])
    return torch.stack(batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ds_configs/tiny_cpu.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    a = p.parse_args()
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg)
    save_config(cfg, f"{cfg.run_dir}/demo/config.yaml")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"imaging library: {pil_info()}", flush=True)
    print(f"model {cfg.model.name} @ {model.sizes.img_size}px, k={model.sizes.block_size}: {n_params / 1e6:.1f}M parameters; "
          f"{a.steps} steps of {cfg.optim.global_batch_size} images")
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    loss_fn = NextBlockLoss(cfg.objective.loss)
    photos = load_photos()
    warmup = min(cfg.schedule.warmup_steps, a.steps // 5)
    losses, t0 = [], time.perf_counter()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps=a.steps, warmup_steps=warmup, peak_lr=cfg.optim.lr,
                                warmup_start_lr=cfg.schedule.warmup_start_lr, final_lr=cfg.schedule.final_lr)
        x = random_crops(photos, cfg.optim.global_batch_size, model.sizes.img_size, cfg.data.crop_scale,
                         cfg.data.crop_ratio, g)
        # fp32: most CPUs emulate bf16 matmuls (25x slower here); bf16 is the engine's, on GPUs.
        out = model(x)
        loss = loss_fn(out.preds, out.targets)
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}", flush=True)
    dt = time.perf_counter() - t0
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"\nloss {first:.4f} -> {last:.4f} ({100 * (last - first) / first:+.1f}%) over {a.steps} steps, "
          f"{a.steps * cfg.optim.global_batch_size / dt:.1f} images/s, {dt:.0f} s")


if __name__ == "__main__":
    main()
