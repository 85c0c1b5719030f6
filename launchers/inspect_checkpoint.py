"""What a checkpoint holds and whether a planned allocation can resume it exactly.

    .venv/bin/python launchers/inspect_checkpoint.py runs/tiny_cpu      # the latest complete checkpoint
    .venv/bin/python launchers/inspect_checkpoint.py runs/h14/checkpoints/step_00012000 --world-size 64
    .venv/bin/python launchers/inspect_checkpoint.py runs/h14 --world-size 64 \\
        --config ds_configs/xtra_vit_h14_in21k.yaml optim.micro_batch_size=24

Shows the step, the layout that saved it (world size, micro batch × accumulation, loader workers),
the data position in layout-free terms (epoch and step of it, canonical streams), and for every
``--world-size`` the batch split a resume would use, or why it would be refused. With ``--config``
(and ``key=value`` overrides) the planned run's micro batch and data order are checked too.
Reads only the small ``COMPLETE`` marker and one model-states file; nothing is loaded or changed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from xtra_ds.config import ConfigError, batch_plan, load_config
from xtra_ds.rundir import COMPLETE, CheckpointRecord, RunDir


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from itself, its run directory or the run's checkpoints folder."""
    if (path / COMPLETE).is_file():
        return path
    run = path.parent if path.name == "checkpoints" else path
    done = RunDir(str(run)).complete_checkpoints() if run.is_dir() else []
    if not done:
        raise SystemExit(f"{path}: no complete checkpoint there (a run directory, its checkpoints/ folder, or a "
                         f"checkpoints/step_XXXXXXXX folder with a {COMPLETE} file)")
    return Path(done[-1])


def describe(ckpt: Path, worlds: list[int], cfg=None) -> list[str]:
    meta = CheckpointRecord.from_json((ckpt / COMPLETE).read_bytes())
    layout, data, global_batch = meta.layout, meta.data, meta.global_batch
    lines = [f"checkpoint {ckpt}",
             f"  step {meta.step}" + (f" of {meta.total_steps}" if meta.total_steps else "")
             + (f"; ZeRO-{meta.zero_stage} {meta.precision}" if meta.zero_stage is not None else "")
             + (f"; global batch {global_batch}" if global_batch else ""),
             f"  saved by {meta.world_size} ranks"
             + (f": micro batch {layout['micro_batch']} × {layout['accum']} accumulation per rank, "
                f"{layout['loader_workers']} loader workers per rank" if layout else "")]
    if data:
        lines.append(f"  data: epoch {data['epoch']}, step {data['step']} of its {data['steps_per_epoch']}; "
                     f"{data['streams']} canonical streams, seed {data['seed']}, shard list {data['shards']}")
    else:
        lines.append("  data: position not recorded (a checkpoint from before layout-free data order)")
    copies = sorted(p.name for p in ckpt.glob("world_*") if (p / COMPLETE).is_file())
    if copies:
        lines.append(f"  re-partitioned copies: {', '.join(copies)}")
    if cfg is not None and data:
        lines.append("  data order of the planned config: " + _order_verdict(data, cfg))
    stage = meta.zero_stage
    if cfg is not None and stage is not None and cfg.deepspeed.zero_stage != stage:
        lines.append(f"  ZeRO stage of the planned config: {cfg.deepspeed.zero_stage}, the checkpoint's {stage}: "
                     f"DeepSpeed cannot load it; every layout below is refused")
    if worlds:
        if not global_batch:
            lines.append("planned layouts: unknown (the checkpoint does not record its global batch)")
            return lines
        micro = cfg.optim.micro_batch_size if cfg is not None else layout.get("micro_batch", global_batch)
        optim = replace(load_config(None).optim, global_batch_size=global_batch, micro_batch_size=micro)
        lines.append(f"planned layouts (global batch {global_batch}, micro batch at most {micro}):")
        for world in worlds:
            refusal = _layout_refusal(meta, world, cfg)
            try:
                plan = batch_plan(optim, world)
            except ConfigError as e:
                refusal = refusal or str(e)
            if refusal:
                lines.append(f"  {world:>5} ranks: refused — {refusal}")
                continue
            how = (f"{plan.accum} micro batch{'es' if plan.accum > 1 else ''} of {plan.micro_batch} per rank"
                   if plan.even else f"rank shares of {global_batch // world}–{-(-global_batch // world)} images, "
                   f"{plan.accum} micro batch{'es' if plan.accum > 1 else ''} of at most {plan.micro_batch} "
                   f"(losses weighted by size)")
            moved = "" if world == meta.world_size else "; ZeRO-3 states re-partitioned at start"
            lines.append(f"  {world:>5} ranks: exact — {how}{moved}")
    return lines


def _layout_refusal(meta: CheckpointRecord, world: int, cfg) -> str:
    """Why a resume on ``world`` ranks would be refused for what the checkpoint is (not the batch split)."""
    stage, saved = meta.zero_stage, meta.world_size
    if cfg is not None and stage is not None and cfg.deepspeed.zero_stage != stage:
        return f"the planned config uses ZeRO-{cfg.deepspeed.zero_stage}, the checkpoint was saved by ZeRO-{stage}"
    if world != saved and stage is not None and stage != 3:
        return (f"a ZeRO-{stage} checkpoint is re-partitioned only at stage 3: resume it on {saved} ranks "
                f"(deepspeed.zero_stage=3 checkpoints move between world sizes)")
    return ""


def _order_verdict(saved: dict, cfg) -> str:
    """The planned config's data order against the checkpoint's, as the loader will judge it at resume."""
    from xtra_ds.data.build import planned_order, training_data
    from xtra_ds.data.train_loader import describe_changes, order_changes

    try:
        source, note = training_data(cfg.data), ""
    except Exception as e:  # noqa: BLE001 - the rest is still worth saying
        source, note = None, f"; the shard list was not checked ({str(e)[:200]})"
    planned = planned_order(cfg.data, seed=cfg.seed, global_batch=cfg.optim.global_batch_size, source=source)
    changed = order_changes(saved, planned)
    if not changed:
        return f"the same ({', '.join(planned)}){note}"
    return (f"CHANGED ({describe_changes(changed)}): a resume is refused unless data.on_order_change=next_epoch "
            f"(then it goes on at the next epoch){note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory, its checkpoints/ folder or one checkpoints/step_XXXXXXXX")
    parser.add_argument("--world-size", type=int, action="append", default=[], help="a planned number of ranks "
                        "(repeat for several)")
    parser.add_argument("--config", help="the planned run's config (recipe name or YAML)")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides of --config, e.g. optim.micro_batch_size=16")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides) if args.config or args.overrides else None
    print("\n".join(describe(find_checkpoint(Path(args.path)), args.world_size, cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
