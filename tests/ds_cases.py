"""DeepSpeed cases that run in a fresh process of their own (one rank, gloo): ``python ds_cases.py CASE OUT.json``.

DeepSpeed's ``zero.Init`` and engines change process-wide state (the process group, torch's linear),
so tests/test_numerics.py runs each case here and asserts on the JSON it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def setup(overrides=()):
    from xtra_ds.config import batch_plan, derive, load_config
    from xtra_ds.engine.dist import init, rank_info, single_rank_env

    single_rank_env()
    init(rank_info())
    cfg = load_config(ROOT / "ds_configs/test_micro.yaml", ["model.drop_path=0.1", *overrides])
    return cfg, derive(cfg, batch_plan(cfg.optim, 1), data_samples=cfg.optim.global_batch_size)


def gathered(module) -> dict[str, torch.Tensor]:
    from xtra_ds.engine.export import full_fp32_state

    return full_fp32_state(module)


def case_init() -> dict:
    """The model built under zero.Init (as the engine builds it) against the plain build, same seed."""
    import deepspeed

    from xtra_ds.config.deepspeed import deepspeed_dict
    from xtra_ds.engine.builder import build_model
    from xtra_ds.engine.schedule import param_groups

    cfg, plan = setup(["deepspeed.precision=fp32"])
    torch.manual_seed(cfg.seed)
    plain = build_model(cfg.model, plan.sizes)
    torch.manual_seed(cfg.seed)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_dict(cfg, plan.batch)):
        zero = build_model(cfg.model, plan.sizes)
    partitioned = all(hasattr(p, "ds_id") for p in zero.parameters())
    ref = dict(plain.named_parameters())
    names = {id(p): n for m in (plain, zero) for n, p in m.named_parameters()}
    groups = [[sorted(names[id(p)] for p in g["params"]) for g in param_groups(m, 0.05)] for m in (plain, zero)]
    out = {"partitioned": partitioned, "max_abs_diff": {}, "decay_groups_plain": groups[0],
           "decay_groups_zero": groups[1]}
    for name, p in zero.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out["max_abs_diff"][name] = float((p.detach().float() - ref[name].detach().float()).abs().max())
            if name == "enc.patch_embed.proj.weight":
                out["patch_std"] = float(p.detach().float().std())
                out["patch_fan_in"] = p.shape[1] * p.shape[2] * p.shape[3]
            if name == "enc.patch_embed.proj.bias":
                out["patch_bias_abs_max"] = float(p.detach().abs().max())
    return out


def images(plan, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    size = plan.sizes.img_size
    return [{"images": torch.randint(0, 256, (plan.batch.micro_batch, size, size, 3), dtype=torch.uint8, generator=g)}
            for _ in range(n)]


def case_engine_vs_plain() -> dict:
    """A 1-rank fp32 ZeRO-3 engine and plain PyTorch started from the engine's own gathered initial
    weights, stepped by the same train_step on the same batches; and two deliberately wrong references."""
    from xtra_ds.engine.builder import build_engine, build_model
    from xtra_ds.engine.schedule import lr_at, param_groups
    from xtra_ds.engine.step import PlainEngine, train_step
    from xtra_ds.objective import NextBlockLoss

    cfg, plan = setup(["deepspeed.precision=fp32", "optim.global_batch_size=8", "optim.micro_batch_size=4"])
    engine, _ = build_engine(cfg, plan)
    start = gathered(engine.module)
    data = images(plan, 12, seed=5)
    cpu = torch.device("cpu")

    def lr(step, scale=1.0):
        return scale * lr_at(step, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=cfg.optim.lr,
                             warmup_start_lr=cfg.schedule.warmup_start_lr, final_lr=cfg.schedule.final_lr)

    def run(stepper, lr_scale=1.0):
        losses, norms = [], []
        for step in range(6):
            torch.manual_seed(1000 + step)  # the same drop-path draws for every stepper
            res = train_step(stepper, data[2 * step:2 * step + 2], loss_fn=NextBlockLoss(), lr=lr(step, lr_scale),
                             order=None, device=cpu)
            losses.append(res.loss)
            norms.append(res.grad_norm)
        return losses, norms

    def plain(wrong_init: bool = False):
        model = build_model(cfg.model, plan.sizes)
        model.load_state_dict(start)
        if wrong_init:  # the patch embedding with PyTorch's default Conv2d init, as under the old zero.Init bug
            torch.nn.Conv2d.reset_parameters(model.enc.patch_embed.proj)
        opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), betas=tuple(cfg.optim.betas),
                                eps=cfg.optim.eps)
        return PlainEngine(model, opt, accum=plan.batch.accum, grad_clip=cfg.optim.grad_clip)

    def distance(stepper) -> float:
        """||w_engine - w|| / ||w_engine|| over all parameters after the steps."""
        diff = sum(float((end[k] - v.detach()).square().sum()) for k, v in stepper.module.named_parameters())
        return (diff / sum(float(t.square().sum()) for t in end.values())) ** 0.5

    out = {"engine": run(engine)}
    end = gathered(engine.module)
    for name, stepper, lr_scale in (("plain", plain(), 1.0), ("plain_wrong_init", plain(wrong_init=True), 1.0),
                                    ("plain_lr_off", plain(), 1.05)):
        out[name] = run(stepper, lr_scale)
        out[f"{name}_distance"] = distance(stepper)
    return out


def case_bf16_targets() -> dict:
    """The bf16 engine's targets against targets computed in fp32 from the same images."""
    from xtra_ds.data.transforms import normalize_on_device
    from xtra_ds.engine.builder import build_engine
    from xtra_ds.models.tokens import image_blocks, normalize_blocks

    cfg, plan = setup(["deepspeed.precision=bf16"])
    engine, _ = build_engine(cfg, plan)
    batch = images(plan, 1, seed=3)[0]
    x = normalize_on_device(batch["images"])
    out = engine(x)
    ref = normalize_blocks(image_blocks(x.float(), plan.sizes.patch_size * plan.sizes.block_size))
    return {"preds_dtype": str(out.preds[0].dtype), "targets_dtype": str(out.targets.dtype),
            "max_abs_diff": float((out.targets - ref).abs().max())}


def case_metrics_window(shards: str, run_dir: str) -> dict:
    """A 1-rank run whose loader stalls 1.5 s before the batch of step 5; log lines every 3 steps."""
    import time

    from xtra_ds.config import load_config
    from xtra_ds.engine.builder import build
    from xtra_ds.engine.dist import single_rank_env

    single_rank_env()
    cfg = load_config(ROOT / "ds_configs/test_micro.yaml",
                      [f"data.train={shards}", f"run_dir={run_dir}", "data.num_workers=0", "deepspeed.precision=fp32",
                       "schedule.total_steps=6", "logging.log_every=3", "checkpoint.every_steps=0",
                       "checkpoint.export_every=0", "logging.recon_every=0", "optim.micro_batch_size=8"])
    trainer = build(cfg)

    class Stalling:  # the loader, with a stall at one batch between two log lines
        def __init__(self, loader):
            self.loader, self.stalled = loader, 0.0

        def __getattr__(self, name):
            return getattr(self.loader, name)

        @property
        def total_wait(self) -> float:
            return self.loader.total_wait + self.stalled

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i == 4:
                    time.sleep(1.5)
                    self.stalled += 1.5
                yield batch

    trainer.loader = Stalling(trainer.loader)
    trainer.train()
    trainer.metrics.close()
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows}


def case_universal(checkpoint: str, work: str) -> dict:
    """DeepSpeed's own universal-checkpoint path on a multi-rank ZeRO-3 checkpoint, loaded on 1 rank: each
    parameter group's weight decay after the load, and each sub-group's Adam step after one more step."""
    import subprocess

    from xtra_ds.engine.builder import build_engine
    from xtra_ds.engine.step import train_step
    from xtra_ds.objective import NextBlockLoss

    folder = Path(checkpoint)
    universal = Path(work) / "universal" / folder.name
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
                    "--output_folder", str(universal), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                   check=True, capture_output=True)
    cfg, plan = setup(["deepspeed.precision=fp32", "model.drop_path=0",
                       "deepspeed.extra={checkpoint: {load_universal: true}}"])
    engine, _ = build_engine(cfg, plan)
    engine.load_checkpoint(str(universal.parent), tag=folder.name, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    torch_optim = engine.optimizer.optimizer
    decay = [g["weight_decay"] for g in torch_optim.param_groups]
    train_step(engine, images(plan, plan.batch.accum, seed=5), loss_fn=NextBlockLoss(), lr=1e-4, order=None,
               device=torch.device("cpu"))
    steps = [float(s["step"]) for s in torch_optim.state.values()]
    return {"weight_decay": decay, "steps": steps, "saved_step": int(engine.global_steps) - 1}


if __name__ == "__main__":
    case, path, *args = sys.argv[1:]
    Path(path).write_text(json.dumps(globals()[f"case_{case}"](*args)))
