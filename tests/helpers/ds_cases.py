"""DeepSpeed cases that run in a fresh process of their own (one rank, gloo), from tests/:
``python helpers/ds_cases.py CASE OUT.json``.

DeepSpeed's ``zero.Init`` and engines change process-wide state (the process group, torch's linear),
so tests/test_numerics.py runs each case here and asserts on the JSON it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


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
    """The model built under zero.Init (as the engine builds it) against the plain build, same seed — in fp32,
    and in bf16, where zero.Init creates every parameter in bf16 (compared with the plain build rounded to
    bf16)."""
    import deepspeed

    from xtra_ds.config.deepspeed import deepspeed_dict
    from xtra_ds.engine.builder import build_model
    from xtra_ds.engine.schedule import param_groups

    out = {}
    for precision in ("fp32", "bf16"):
        cfg, plan = setup([f"deepspeed.precision={precision}"])
        torch.manual_seed(cfg.seed)
        plain = build_model(cfg.model, plan.sizes)
        torch.manual_seed(cfg.seed)
        with deepspeed.zero.Init(config_dict_or_path=deepspeed_dict(cfg, plan.batch)):
            zero = build_model(cfg.model, plan.sizes)
        res = out[precision] = {"partitioned": all(hasattr(p, "ds_id") for p in zero.parameters()),
                                "max_abs_diff": {}}
        ref = dict(plain.named_parameters())
        names = {id(p): n for m in (plain, zero) for n, p in m.named_parameters()}
        groups = [[sorted(names[id(p)] for p in g["params"]) for g in param_groups(m, 0.05)] for m in (plain, zero)]
        res["decay_groups_plain"], res["decay_groups_zero"] = groups
        for name, p in zero.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                res["dtype"] = str(p.dtype)
                want = ref[name].detach().to(p.dtype).float()
                res["max_abs_diff"][name] = float((p.detach().float() - want).abs().max())
                if name == "enc.patch_embed.proj.weight":
                    res["patch_std"] = float(p.detach().float().std())
                    res["patch_fan_in"] = p.shape[1] * p.shape[2] * p.shape[3]
                if name == "enc.patch_embed.proj.bias":
                    res["patch_bias_abs_max"] = float(p.detach().abs().max())
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


def case_leaf_blocks() -> dict:
    """A 1-rank fp32 ZeRO-3 engine with ``deepspeed.zero3_leaf_blocks`` on and off, from the same init: which
    modules DeepSpeed flags as ZeRO-3 leaves, which modules inside a transformer block got ZeRO-3's own module
    hooks (a leaf's children get none: its parameters are fetched and released with it), and the losses and
    gradient norms of the same four steps."""
    from deepspeed.utils import z3_leaf_module

    from xtra_ds.engine.builder import build_engine
    from xtra_ds.engine.step import train_step
    from xtra_ds.models.layers import Block
    from xtra_ds.objective import NextBlockLoss

    out = {}
    for on in (True, False):
        cfg, plan = setup(["deepspeed.precision=fp32", "optim.global_batch_size=8", "optim.micro_batch_size=4",
                           f"deepspeed.zero3_leaf_blocks={str(on).lower()}"])
        engine, ds_config = build_engine(cfg, plan)
        data = images(plan, 8, seed=5)
        modules = dict(engine.module.named_modules())
        blocks = [n for n, m in modules.items() if isinstance(m, Block)]
        losses, norms = [], []
        for step in range(4):
            torch.manual_seed(1000 + step)  # the same drop-path draws for both
            res = train_step(engine, data[2 * step:2 * step + 2], loss_fn=NextBlockLoss(), lr=1e-3, order=None,
                             device=torch.device("cpu"))
            losses.append(res.loss)
            norms.append(res.grad_norm)
        out["on" if on else "off"] = {
            "leaf_module_config": ds_config["zero_optimization"].get("leaf_module"),
            "blocks": blocks, "leaves": [n for n, m in modules.items() if z3_leaf_module(m)],
            "hooked_in_blocks": [n for n, m in modules.items()
                                 if any(n.startswith(b + ".") for b in blocks) and hasattr(m, "ds_id")],
            "losses": losses, "norms": norms}
    return out


def case_skipped_steps(kind: str) -> dict:
    """A step whose loss is not finite (one image of the last micro batch NaN) and a step whose loss is
    finite but whose gradients are not (a backward hook), each compared with the state before it: the
    fp32 master weights, every tensor and number of the optimizer's state. ``kind``: ``zero3`` (fp32),
    ``zero3_bf16``, ``zero0`` (fp32: DeepSpeed hands the gradients straight to AdamW) or ``plain``."""
    import math

    from xtra_ds.engine.builder import build_engine, build_model
    from xtra_ds.engine.schedule import param_groups
    from xtra_ds.engine.step import PlainEngine, train_step
    from xtra_ds.objective import NextBlockLoss

    stage, precision = {"zero3": (3, "fp32"), "zero3_bf16": (3, "bf16"), "zero0": (0, "fp32"),
                        "plain": (3, "fp32")}[kind]
    cfg, plan = setup([f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "model.drop_path=0",
                       "optim.global_batch_size=8", "optim.micro_batch_size=4"])
    if kind == "plain":
        model = build_model(cfg.model, plan.sizes)
        engine = PlainEngine(model, torch.optim.AdamW(param_groups(model, 0.05)), accum=plan.batch.accum,
                             grad_clip=cfg.optim.grad_clip)
    else:
        engine, _ = build_engine(cfg, plan)
    optimizer = engine.skip_guard.optimizer

    def state() -> dict[str, torch.Tensor]:
        """Gathered master weights, and every tensor AdamW keeps: the parameters it steps (ZeRO-3's flat fp32
        partitions, which it holds only during DeepSpeed's step) and their state, in the state's order."""
        out = {f"weight/{k}": v for k, v in gathered(engine.module).items()}
        for i, (p, st) in enumerate(optimizer.state.items()):
            out[f"param/{i}"] = p.detach().float().clone()
            for key, value in st.items():
                out[f"state/{i}/{key}"] = torch.as_tensor(value).detach().float().clone()
        return out

    def differs(a: dict, b: dict) -> list[str]:
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
        return sorted(k for k in a if not torch.equal(a[k], b[k]))

    def step(seed: int, poison: bool = False, grad_nan: bool = False):
        batches = images(plan, plan.batch.accum, seed)
        if poison:
            batches[-1]["poison"] = [0]
        hook = None

        def nan_grads(module, inputs, out) -> None:  # finite loss, non-finite gradients into the encoder
            out.register_hook(lambda g: torch.full_like(g, float("nan")))

        if grad_nan:
            hook = engine.module.enc.register_forward_hook(nan_grads)
        res = train_step(engine, batches, loss_fn=NextBlockLoss(), lr=1e-3, order=None, device=torch.device("cpu"))
        if hook is not None:
            hook.remove()
        return res

    step(1)  # Adam's state exists from here on
    before = state()
    nan_loss = step(2, poison=True)
    after_nan_loss = state()
    nan_grad = step(3, grad_nan=True)
    after_nan_grad = state()
    good = step(4)
    return {"nan_loss": {"loss": nan_loss.loss, "skipped": nan_loss.skipped,
                         "changed": differs(before, after_nan_loss)},
            "nan_grad": {"loss": nan_grad.loss, "finite_loss": math.isfinite(nan_grad.loss),
                         "skipped": nan_grad.skipped, "changed": differs(after_nan_loss, after_nan_grad)},
            "good": {"skipped": good.skipped, "changed": len(differs(after_nan_grad, state()))},
            "tensors": len(before)}


def case_subgroups(work: str) -> dict:
    """A 1-rank ZeRO-3 checkpoint saved with DeepSpeed's ``sub_group_size`` 0 (one sub-group per parameter in
    DeepSpeed 0.19) and with a small size (several sub-groups), re-partitioned for 1 rank by our code: its
    sub-groups, flat partitions and moments must be the saved ones, and DeepSpeed must load it."""
    from xtra_ds.engine.builder import build_engine
    from xtra_ds.engine.step import train_step
    from xtra_ds.interop import ZeroCheckpoint, reshard_rank
    from xtra_ds.objective import NextBlockLoss

    out = {}
    for size in (0, 3000):
        cfg, plan = setup(["deepspeed.precision=fp32", "model.drop_path=0",
                           f"deepspeed.extra={{zero_optimization: {{sub_group_size: {size}}}}}"])
        engine, _ = build_engine(cfg, plan)
        train_step(engine, images(plan, plan.batch.accum, seed=7), loss_fn=NextBlockLoss(), lr=1e-3, order=None,
                   device=torch.device("cpu"))
        root = Path(work) / f"size{size}"
        engine.save_checkpoint(str(root), tag="saved")
        saved = ZeroCheckpoint(root / "saved")
        reshard_rank(saved, 1, 0, root / "again", engine.zero_sub_group_size())
        again = ZeroCheckpoint(root / "again")
        same = [len(saved.meta["param_shapes"]) == len(again.meta["param_shapes"]),
                [list(g) for g in saved.meta["param_shapes"]] == [list(g) for g in again.meta["param_shapes"]]]
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            same.append(all(torch.equal(saved.full(g, o, shape, key), again.full(*where, shape, key))
                            for (name, shape, g, o), where in zip(saved.layout(),
                                                                   [(g2, o2) for _, _, g2, o2 in again.layout()],
                                                                   strict=True)))
        before = gathered(engine.module)
        engine.load_checkpoint(str(root), tag="again", load_optimizer_states=True, load_lr_scheduler_states=False)
        loaded = gathered(engine.module)
        out[str(size)] = {"sub_groups": len(saved.meta["param_shapes"]),
                          "resharded_sub_groups": len(again.meta["param_shapes"]), "same": same,
                          "loads": all(torch.equal(before[k], loaded[k]) for k in before)}
    return out


def case_export_keep() -> dict:
    """The encoder's fp32 state as every rank gathers it for an export: the rank that writes it keeps every
    tensor, the others keep none (each still takes part in every gather)."""
    from deepspeed.utils import safe_get_full_fp32_param

    import xtra_ds.engine.export as export
    from xtra_ds.engine.builder import build_engine

    cfg, plan = setup(["deepspeed.precision=fp32"])
    engine, _ = build_engine(cfg, plan)
    gathers = []

    def counted(p):
        gathers.append(p)
        return safe_get_full_fp32_param(p)

    import deepspeed.utils
    deepspeed.utils.safe_get_full_fp32_param = counted  # what export.full_fp32_state calls
    kept = export.full_fp32_state(engine.module.enc, keep=True)
    n_keep = len(gathers)
    dropped = export.full_fp32_state(engine.module.enc, keep=False)
    return {"kept": len(kept), "params": len(list(engine.module.enc.parameters())), "dropped": len(dropped),
            "gathers_keep": n_keep, "gathers_drop": len(gathers) - n_keep}


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
