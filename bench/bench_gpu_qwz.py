"""Does ZeRO++ qwZ (int8 weight gathers) change XTRA-H/14's loss curve? bf16 ZeRO-3 against ZeRO-3 + qwZ over the
same steps, on one GPU.

    python3 bench/bench_gpu_qwz.py --out qwz_loss.json [--budget 110] [--steps 50] [--batch 8]   # on the GPU
    python3 bench/bench_gpu_qwz.py --build-quantizer --status q.json    # DeepSpeed's quantizer op, JIT-built
    .venv/bin/python bench/bench_gpu_qwz.py --smoke                     # the same code paths on the CPU, micro model

**What one GPU can and cannot show.** DeepSpeed 0.19.8 quantizes a weight only inside a real gather:
``Init.all_gather_coalesced`` returns ``_no_gather_coalesced(params)`` when every parameter's partition group
has one rank, and that handle (``NoGatherCoalescedHandle``) dequantizes only partitions stored quantized
(``ds_quant_scale``: frozen weights under zero_quantized_nontrainable_weights), never trainable ones. So on one
rank ``zero_quantized_weights: true`` builds the quantizer (``CUDAQuantizer`` in ``zero.Init``) and then trains
on exact bf16 weights. To see qwZ's numerics here, this benchmark gives every gathered weight the round trip
it makes on many ranks: it wraps each parameter's ``all_gather_coalesced`` (what ZeRO-3's parameter
coordinator calls, with ``quantize=True`` under qwZ) so that after the no-op gather the weight is quantized
and dequantized by DeepSpeed's own ``CUDAQuantizer`` (symmetric int8, one fp32 scale per group of at most
8000 elements, the group size chosen by DeepSpeed for the tensor's length). Persistent parameters (under
stage3_param_persistence_threshold) are never fetched and stay exact, as on many ranks. The one difference
left: on many ranks the quantized unit is a rank's slice of several parameters concatenated, here a whole
parameter, so group boundaries differ; a group's statistics (4k-16k consecutive weights) do not.

**The runs**, in order, all from the same initial weights (the recipe's seed) on the same batches:

  bf16       ZeRO-3 as the recipe builds it, zero_quantized_weights=false
  qwz        zero_quantized_weights=true plus the round trip above
  bf16-seed  bf16 again with another seed for drop path's draws: how far an unquantized run moves under a
             change that does not matter, the scale to judge qwz's deviation by (run if the budget allows)

The data: a fixed set of --images smooth random fields (sums of upsampled low-resolution noise, seeded),
cycled in batches of --batch; next-block prediction on them is learnable, so the loss falls. Learning rate:
the recipe's warm-up from schedule.warmup_start_lr to optim.lr, compressed (--warmup, --lr), then its cosine
to schedule.final_lr at --steps. overlap_comm is off in every run (gathers and compute on one stream).

**The quantizer.** DeepSpeed ships its CUDA quantizer as sources (csrc/quantization) that
``QuantizerBuilder().load()`` JIT-compiles with ninja and nvcc the first time (bench/run_gpu.sh starts that
build in the background, --build-quantizer, while the other sections run). --quantizer auto waits up to
--jit-wait seconds for the build's status file and uses the kernel if it built; otherwise
(or with --quantizer torch, and always on the CPU) ``TorchQuantizerOps``, the kernel's arithmetic in torch,
takes its place inside CUDAQuantizer. When the kernel is there, the two are compared on weight-sized tensors.

JSON (--out) after every run and every 10 steps: both curves step by step, grad norms, per-step relative
differences, their max and mean, the backend used.
"""

from __future__ import annotations

from _common import ROOT, STARTED, write_json

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_gpu import RECIPE, SMOKE_RECIPE, BudgetExceeded, env_info, mem_peak, mem_reset, sync

from xtra_ds.config import batch_plan, derive, load_config
from xtra_ds.engine.builder import build_engine
from xtra_ds.engine.dist import init, rank_info, single_rank_env
from xtra_ds.engine.schedule import lr_at
from xtra_ds.engine.step import train_step
from xtra_ds.objective import NextBlockLoss

T0 = STARTED  # the budget counts from the first import, imports included

# --- the quantizer ----------------------------------------------------------------------------


class TorchQuantizerOps:
    """DeepSpeed's quantizer op (csrc/quantization: ``quantize``/``dequantize``, symmetric, 8 bits) in torch, with
    the op's signatures, so that it can stand in ``CUDAQuantizer.quantizer_cuda_module``.

    Per group of consecutive elements of the fp16 input: scale = 2^bits / (2 * absmax) (1 when absmax is 0),
    q = clamp(round_half_even(x * scale), -2^(bits-1), 2^(bits-1) - 1) as int8, and the stored parameter is
    1 / scale (fp32, one per group); dequantize is q * stored, returned in fp16 (quantization_utils.h,
    ``Params<Symmetric>`` and ``GroupStats<Symmetric>``; conversion_utils.h's ``__float2int_rn``). The kernel is
    built with --use_fast_math, so its divisions may differ in the last bit, and a value on a rounding boundary
    may land one step away (``compare_quantizers`` counts them).
    """

    Symmetric = "symmetric"

    def quantize(self, x: torch.Tensor, groups: int, bits: int, kind) -> list[torch.Tensor]:
        if bits != 8 or kind != self.Symmetric:
            raise NotImplementedError(f"only symmetric 8-bit quantization is emulated (asked: {bits} bits, {kind})")
        g = x.float().reshape(groups, -1)
        absmax = g.abs().amax(dim=1, keepdim=True)
        scale = torch.where(absmax == 0, torch.ones_like(absmax), 2.0**bits / (2 * absmax))
        q = torch.round(g * scale).clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int8)
        return [q.reshape(x.shape), (1.0 / scale).reshape(groups, 1)]

    def dequantize(self, q: torch.Tensor, params: torch.Tensor, groups: int, bits: int, kind) -> torch.Tensor:
        return (q.float().reshape(groups, -1) * params.reshape(groups, 1)).reshape(q.shape).half()


def kernel_quantizer_ok() -> str | None:
    """None if DeepSpeed's CUDA quantizer op loads (built already, or buildable now), else why not."""
    try:
        from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

        CUDAQuantizer()  # QuantizerBuilder().load(): JIT-builds unless the build directory holds it
        return None
    except Exception as e:  # noqa: BLE001 - reported; the torch stand-in is used instead
        return f"{type(e).__name__}: {str(e)[-800:]}"


def use_torch_quantizer() -> None:
    """Put TorchQuantizerOps where CUDAQuantizer keeps its compiled op (a class attribute shared by every
    instance, zero.Init's included), so nothing is JIT-built."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    CUDAQuantizer.quantizer_cuda_module = TorchQuantizerOps()


def round_trip(quantizer, w: torch.Tensor) -> torch.Tensor:
    """``w`` as qwZ's gathers deliver it: quantized and dequantized by ``quantizer`` (a CUDAQuantizer)."""
    q, scales = quantizer.quantize(w.reshape(-1))
    return quantizer.dequantize(q, scales, dtype=w.dtype).reshape(w.shape)


def quantize_gathers(module: torch.nn.Module, quantizer) -> dict:
    """Make ZeRO-3's no-op gathers on one rank deliver quantized weights, as qwZ's gathers do on many.

    Every ZeRO-3 parameter carries ``all_gather_coalesced`` (DeepSpeed's closure; the coordinator calls the
    first parameter's with the whole group and ``quantize=zero_quantized_weights``). The wrapper calls it, and
    when asked to quantize, replaces each gathered parameter's data (on one rank a view of its bf16 partition)
    by ``round_trip``; the partition, which the optimizer updates, stays exact. Returns live counters.
    """
    from deepspeed.runtime.zero.partition_parameters import NoGatherCoalescedHandle, NoGatherHandle

    counts = {"gather_calls": 0, "params_quantized": 0, "elements_quantized": 0, "skipped_not_multiple_of_8": 0}

    def wrap(original):
        def all_gather_coalesced(params, safe_mode: bool = False, quantize: bool = False):
            params = list(params)
            handle = original(params, safe_mode=safe_mode, quantize=quantize)
            if quantize and params:
                if not isinstance(handle, (NoGatherCoalescedHandle, NoGatherHandle)):
                    raise RuntimeError("a real gather: with more than one rank DeepSpeed quantizes by itself; this "
                                       "stand-in is for one rank")
                counts["gather_calls"] += 1
                for p in params:
                    if p.numel() % 8:  # DeepSpeed's quantizer wants multiples of 8 (its group search asserts)
                        counts["skipped_not_multiple_of_8"] += 1
                        continue
                    p.data = round_trip(quantizer, p.data)
                    counts["params_quantized"] += 1
                    counts["elements_quantized"] += p.numel()
            return handle
        return all_gather_coalesced

    wrapped = 0
    for p in module.parameters():
        if hasattr(p, "all_gather_coalesced"):
            p.all_gather_coalesced = wrap(p.all_gather_coalesced)
            wrapped += 1
    if not wrapped:
        raise RuntimeError("no ZeRO-3 parameter found (no all_gather_coalesced): is deepspeed.zero_stage 3?")
    counts["params_wrapped"] = wrapped
    return counts


def compare_quantizers(device, shapes: list[tuple[int, ...]], kernel: bool) -> dict:
    """The round trip's relative error ||deq(q(w)) - w|| / ||w|| on weight-like bf16 tensors (N(0, 0.02)) through
    TorchQuantizerOps, and with ``kernel`` through DeepSpeed's CUDA op too, with how often the two agree."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    emulated = CUDAQuantizer.__new__(CUDAQuantizer)  # DeepSpeed's group-size search, torch's arithmetic
    emulated.quantizer_cuda_module = TorchQuantizerOps()
    compiled = CUDAQuantizer() if kernel else None
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for shape in shapes:
        w = (0.02 * torch.randn(shape, generator=g)).to(device, torch.bfloat16)
        b = round_trip(emulated, w)
        row = {"shape": list(shape), "rel_error_torch": _rel(b, w)}
        if compiled is not None:
            k = round_trip(compiled, w)
            row.update(rel_error_kernel=_rel(k, w), max_abs_kernel_vs_torch=float((k.float() - b.float()).abs().max()),
                       equal_fraction=float((k == b).float().mean()))
        out.append(row)
    return {"tensors": out}


def _rel(a: torch.Tensor, w: torch.Tensor) -> float:
    return float((a.float() - w.float()).norm() / w.float().norm())


def build_quantizer(status_path: Path) -> int:
    """JIT-build DeepSpeed's quantizer op (for bench/run_gpu.sh, in the background) and write how it went."""
    status = {"started_s": round(time.time(), 1)}

    def stop(signum, frame):
        raise BudgetExceeded(f"{signal.Signals(signum).name} after {time.monotonic() - T0:.0f} s")
    signal.signal(signal.SIGTERM, stop)
    t = time.monotonic()
    try:
        from deepspeed.ops.op_builder import QuantizerBuilder

        QuantizerBuilder().load(verbose=True)
        status.update(ok=True)
    except BaseException as e:  # noqa: BLE001 - a timeout included: the status says why
        status.update(ok=False, error=f"{type(e).__name__}: {str(e)[-3000:]}")
        traceback.print_exc()
    status["seconds"] = round(time.monotonic() - t, 1)
    status["env"] = {k: os.environ.get(k) for k in ("TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                                    "CUDA_HOME")}
    write_json(status_path, status)
    print(f"quantizer build: {'ok' if status['ok'] else 'FAILED'} in {status['seconds']:.0f} s", flush=True)
    return 0 if status["ok"] else 1


def choose_quantizer(a, report: dict) -> str:
    """'kernel' or 'torch' (see the module's docstring); the choice and why go into ``report``."""
    if a.quantizer == "torch" or a.smoke:
        use_torch_quantizer()
        report["quantizer"] = {"backend": "torch", "why": "asked" if a.quantizer == "torch" else "CPU"}
        return "torch"
    why = None
    if a.quantizer == "auto" and a.jit_status:
        status_path = Path(a.jit_status)
        wait_until = min(time.monotonic() + a.jit_wait, a.deadline - 30)
        while not status_path.exists() and time.monotonic() < wait_until:
            time.sleep(1)
        if not status_path.exists():
            why = f"the background build had not finished after waiting {a.jit_wait:.0f} s"
        else:
            status = json.loads(status_path.read_text())
            report["quantizer_build"] = status
            if not status.get("ok"):
                why = f"the background build failed: {status.get('error', '?')[-500:]}"
    if why is None:
        t = time.monotonic()
        why = kernel_quantizer_ok()
        report["quantizer_load_s"] = round(time.monotonic() - t, 1)
    if why is None:
        report["quantizer"] = {"backend": "kernel", "why": "DeepSpeed's CUDA quantizer op loaded"}
        return "kernel"
    use_torch_quantizer()
    report["quantizer"] = {"backend": "torch", "why": why}
    print(f"quantizer: the torch stand-in ({why[:300]})", flush=True)
    return "torch"


# --- data ---------------------------------------------------------------------------------------

def smooth_fields(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` RGB images, uint8 [n, size, size, 3]: sums of bicubically upsampled Gaussian noise at 2..16 cells per
    side (weights halving with the frequency), stretched to 0..255 per image. Smooth, so a block's pixels
    follow from its neighbours': a next-block model can learn them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for cells, weight in ((2, 1.0), (4, 0.5), (8, 0.25), (16, 0.125)):
        noise = torch.randn(n, 3, cells + 1, cells + 1, generator=g)
        x += weight * F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=True)
    lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# --- the runs -------------------------------------------------------------------------------------

def trajectory(rec: dict, cfg, plan, images: torch.Tensor, *, qwz: bool, device, steps: int, deadline: float,
               on_progress) -> None:
    """Train ``steps`` steps from the recipe's initial weights with drop path seeded by ``rec["drop_path_seed"]``;
    the loss and grad norm of each go into ``rec`` as they come (a stop keeps what was done)."""
    from deepspeed.runtime.zero.partition_parameters import CUDAQuantizer

    rec.update(zero_quantized_weights=qwz, losses=[], grad_norms=[], lrs=[], status="running")
    mem_reset(device)
    t = time.monotonic()
    engine, ds_config = build_engine(cfg, plan)
    rec["build_s"] = round(time.monotonic() - t, 1)
    try:
        rec["zero_optimization"] = ds_config["zero_optimization"]
        if qwz:
            rec["gathers"] = quantize_gathers(engine.module, CUDAQuantizer())
        torch.manual_seed(rec["drop_path_seed"])  # drop path's draws from here on
        loss_fn, mb, n = NextBlockLoss(cfg.objective.loss), plan.batch.micro_batch, len(images)
        t = time.monotonic()
        for step in range(steps):
            if time.monotonic() > deadline:
                rec["truncated"] = f"budget: {step} of {steps} steps"
                break
            lr = lr_at(step, total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=cfg.optim.lr,
                       warmup_start_lr=cfg.schedule.warmup_start_lr, final_lr=cfg.schedule.final_lr)
            batch = images[(step * mb) % n:(step * mb) % n + mb]
            res = train_step(engine, [{"images": batch}], loss_fn=loss_fn, lr=lr, order=None, device=device)
            rec["losses"].append(res.loss)
            rec["grad_norms"].append(res.grad_norm)
            rec["lrs"].append(lr)
            if (step + 1) % 10 == 0:
                on_progress()
        sync(device)
        rec["steps"] = len(rec["losses"])
        rec["step_s"] = round((time.monotonic() - t) / max(1, rec["steps"]), 4)
        rec["peak_mem_gib"] = round(mem_peak(device), 2)
        rec["status"] = "ok"
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        mem_reset(device)


def deviation(curve: list[float], ref: list[float]) -> dict:
    """|curve - ref| / ref per step over the common steps: max, mean, mean of the last 10, and the list."""
    n = min(len(curve), len(ref))
    rel = [abs(a - b) / abs(b) for a, b in zip(curve[:n], ref[:n], strict=True) if math.isfinite(a + b) and b]
    if not rel:
        return {"steps": 0}
    tail = rel[-10:]
    return {"steps": n, "max": max(rel), "mean": sum(rel) / len(rel), "mean_last10": sum(tail) / len(tail),
            "argmax_step": rel.index(max(rel)), "per_step": [round(x, 6) for x in rel]}


def summarize(report: dict) -> str:
    runs = {r["run"]: r for r in report["runs"] if r.get("losses")}
    lines = [f"{'run':<11}{'steps':>6}{'loss@1':>9}{'loss@10':>9}{'loss@end':>10}{'s/step':>8}  vs bf16 (max / mean "
             f"/ last-10 mean relative difference)"]
    for name, r in runs.items():
        losses = r["losses"]
        at10 = f"{losses[9]:>9.4f}" if len(losses) >= 10 else f"{'-':>9}"
        dev = report["deviation"].get(name)
        vs = (f"{dev['max']:.2e} / {dev['mean']:.2e} / {dev['mean_last10']:.2e}" if dev and dev.get("steps")
              else "-")
        lines.append(f"{name:<11}{len(losses):>6}{losses[0]:>9.4f}{at10}{losses[-1]:>10.4f}"
                     f"{r.get('step_s', float('nan')):>8.2f}  {vs}")
    q = report.get("quantizer", {})
    lines.append(f"quantizer: {q.get('backend', '?')} ({q.get('why', '')[:160]})")
    for t in report.get("quantizer_check", {}).get("tensors", []):
        k = (f", kernel {t['rel_error_kernel']:.2e}, kernel = torch stand-in for {100 * t['equal_fraction']:.3f}% "
             f"(max diff {t['max_abs_kernel_vs_torch']:.1e})" if "rel_error_kernel" in t else "")
        lines.append(f"  int8 round trip of an N(0, 0.02) {tuple(t['shape'])} weight: relative error torch "
                     f"{t['rel_error_torch']:.2e}{k}")
    if "verdict" in report:
        lines.append(report["verdict"])
    return "\n".join(lines)


def verdict(report: dict) -> str | None:
    dev = report["deviation"]
    q, ref = dev.get("qwz"), dev.get("bf16-seed")
    if not q or not q.get("steps"):
        return None
    s = (f"qwZ vs bf16 over {q['steps']} steps: max {q['max']:.2e}, mean {q['mean']:.2e} relative difference in "
         f"the loss")
    if ref and ref.get("steps"):
        s += (f"; bf16 under another drop-path seed: max {ref['max']:.2e}, mean {ref['mean']:.2e} -> qwZ's deviation "
              f"is {'within' if q['mean'] <= ref['mean'] else 'BEYOND'} that spread (mean)")
    return s


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON results (default qwz_loss.json; runs/qwz_smoke.json with "
                   "--smoke)")
    p.add_argument("--budget", type=float, default=None, help="seconds from process start (default 110; 600 with "
                   "--smoke)")
    p.add_argument("--grace", type=float, default=15.0, help="hard stop this many seconds after the budget")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 50; 12 with --smoke)")
    p.add_argument("--batch", type=int, default=None, help="micro batch = global batch (default 8; 4 with --smoke)")
    p.add_argument("--images", type=int, default=None, help="distinct images, cycled (default 64; 16 with --smoke)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the recipe's optim.lr: 1e-3)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (the recipe's 3 epochs, compressed)")
    p.add_argument("--quantizer", choices=("auto", "kernel", "torch"), default="auto",
                   help="qwZ's quantizer: DeepSpeed's CUDA op, its torch stand-in, or the op if it loads")
    p.add_argument("--jit-status", default=None, help="auto: the background build's status file to wait for")
    p.add_argument("--jit-wait", type=float, default=60.0, help="auto: seconds to wait for that file")
    p.add_argument("--no-reference", action="store_true", help="skip the bf16-seed run")
    p.add_argument("--build-quantizer", action="store_true", help="only JIT-build the quantizer op (see --status)")
    p.add_argument("--status", default="quantizer_build.json", help="--build-quantizer: where to write how it went")
    p.add_argument("--smoke", action="store_true", help="the micro model on the CPU: checks the code paths")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value) for every run")
    a = p.parse_args()
    a.budget = a.budget if a.budget is not None else (600.0 if a.smoke else 110.0)
    a.steps = a.steps or (12 if a.smoke else 50)
    a.batch = a.batch or (4 if a.smoke else 8)
    a.images = a.images or (16 if a.smoke else 64)
    if a.images % a.batch:
        p.error(f"--images {a.images} must be a multiple of --batch {a.batch}")
    a.out = a.out or (str(ROOT / "runs/qwz_smoke.json") if a.smoke else "qwz_loss.json")
    a.deadline = T0 + a.budget
    return a


def main() -> int:
    a = parse_args()
    if a.build_quantizer:
        return build_quantizer(Path(a.status))

    def hard_stop(signum, frame):
        raise BudgetExceeded(f"{signal.Signals(signum).name}: hard stop {time.monotonic() - T0:.0f} s after start")
    signal.signal(signal.SIGALRM, hard_stop)
    signal.signal(signal.SIGTERM, hard_stop)
    signal.alarm(max(1, int(a.budget + a.grace - (time.monotonic() - T0))))
    warnings.filterwarnings("ignore", category=FutureWarning)
    single_rank_env()
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s",
                        datefmt="%H:%M:%S")
    cuda = torch.cuda.is_available() and not a.smoke
    if not cuda and not a.smoke:
        print("no CUDA device: this is a GPU benchmark (use --smoke to check it on the CPU)")
        return 2
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    init(rank_info())
    recipe = SMOKE_RECIPE if a.smoke else RECIPE
    base = [f"optim.micro_batch_size={a.batch}", f"optim.global_batch_size={a.batch}", f"optim.lr={a.lr}",
            f"schedule.total_steps={a.steps}", f"schedule.warmup_steps={a.warmup}", "deepspeed.zero_stage=3",
            "deepspeed.overlap_comm=false", "run_dir=runs/bench_gpu", *a.overrides]
    if a.smoke:
        base.append("deepspeed.param_persistence_threshold=0")  # the micro model's weights are all small
    configs = {q: load_config(recipe, [*base, f"deepspeed.zero_quantized_weights={str(q).lower()}"])
               for q in (False, True)}
    plan = derive(configs[False], batch_plan(configs[False].optim, 1), data_samples=a.batch * a.steps)
    images = smooth_fields(a.images, plan.sizes.img_size, seed=configs[False].seed).to(device)
    cfg = configs[False]
    report = {
        "what": "loss curves of bf16 ZeRO-3 and ZeRO-3 + qwZ (every gathered weight through DeepSpeed's int8 "
                "quantizer, as on many ranks) from the same weights on the same batches; one device",
        "smoke": a.smoke, "recipe": str(recipe.relative_to(ROOT)), "overrides": base, "model": cfg.model.name,
        "sizes": plan.sizes.__dict__, "precision": cfg.deepspeed.precision, "drop_path": cfg.model.drop_path,
        "grad_checkpointing": cfg.model.grad_checkpointing, "steps": a.steps, "micro_batch": a.batch,
        "images": a.images, "lr": {"peak": a.lr, "warmup_steps": plan.warmup_steps, "total_steps": plan.total_steps,
                                   "warmup_start": cfg.schedule.warmup_start_lr, "final": cfg.schedule.final_lr},
        "budget_s": a.budget, "env": {**env_info(device), "deepspeed": deepspeed.__version__},
        "runs": [], "deviation": {},
        "notes": ["one rank: DeepSpeed gathers nothing, so it quantizes nothing by itself; the qwz run's weights go "
                  "through DeepSpeed's CUDAQuantizer at every fetch (bench_gpu_qwz.quantize_gathers)"],
    }
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"{cfg.model.name}: {a.steps} steps of {a.batch} images ({a.images} smooth fields), lr {a.lr:g} after "
          f"{plan.warmup_steps} warm-up steps, ZeRO-3 {cfg.deepspeed.precision}; budget {a.budget:.0f} s "
          f"({time.monotonic() - T0:.0f} s spent on imports)", flush=True)

    def save():
        runs = report["runs"]
        ref = next((r["losses"] for r in runs if r["run"] == "bf16" and r.get("losses")), None)
        if ref:
            report["deviation"] = {r["run"]: deviation(r["losses"], ref) for r in runs
                                   if r["run"] != "bf16" and r.get("losses")}
            v = verdict(report)
            if v:
                report["verdict"] = v
        report["summary"] = summarize(report)
        write_json(out_path, report)

    plan_runs = [("bf16", False, 1), ("qwz", True, 1)] + ([] if a.no_reference else [("bf16-seed", False, 2)])
    need = None  # seconds a whole run took (build and steps), once one has
    try:
        for name, qwz, seed_offset in plan_runs:
            left = a.deadline - time.monotonic()
            if need is not None and name == "bf16-seed" and left < 1.1 * need:  # a partial scale is no scale
                report["runs"].append({"run": name, "status": "skipped",
                                       "reason": f"budget: ~{need:.0f} s needed, {left:.0f} s left"})
                print(f"skip {name}: {report['runs'][-1]['reason']}", flush=True)
                continue
            if qwz:
                backend = choose_quantizer(a, report)
                shapes = [(3840, 1280), (5120, 1280), (1280,)]  # H/14's qkv and fc1 weights, a norm's
                report["quantizer_check"] = compare_quantizers(device, shapes, kernel=backend == "kernel")
            print(f"[{time.monotonic() - T0:5.0f}s] {name} ...", flush=True)
            rec = {"run": name, "drop_path_seed": cfg.seed + seed_offset}
            report["runs"].append(rec)  # filled as it runs: the JSON keeps what a stop leaves
            try:
                trajectory(rec, configs[qwz], plan, images, qwz=qwz, device=device, steps=a.steps,
                           deadline=a.deadline, on_progress=save)
            except BudgetExceeded as e:
                rec["status"] = f"stopped: {e}"
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the next run goes on
                rec.update(status="failed", error=f"{type(e).__name__}: {str(e)[:1500]}",
                           traceback=traceback.format_exc()[-4000:])
                print(f"        failed: {rec['error'].splitlines()[0][:300]}", flush=True)
            if rec.get("status") == "ok":
                need = rec["build_s"] + a.steps * rec["step_s"]
                print(f"        {rec['steps']} steps, {rec['step_s']:.2f} s/step (built in {rec['build_s']:.0f} s): "
                      f"loss {rec['losses'][0]:.4f} -> {rec['losses'][-1]:.4f}"
                      + (f"; {rec['gathers']}" if "gathers" in rec else ""), flush=True)
            save()
    except BudgetExceeded as e:
        report["stopped"] = str(e)
        print(f"stopped: {e}", flush=True)
    signal.alarm(0)
    report["total_s"] = round(time.monotonic() - T0, 1)
    save()
    print("\n" + report["summary"])
    print(f"results: {out_path} ({report['total_s']:.0f} s in all)", flush=True)
    if a.smoke and "stopped" not in report:
        smoke_checks(report)
        save()
    return 0


def smoke_checks(report: dict) -> None:
    """What the CPU run must show, or the GPU run would mean nothing: the qwz run quantized weights at every
    fetch, which moved its loss off bf16's, while bf16's seed run differs only through drop path."""
    runs = {r["run"]: r for r in report["runs"]}
    g = runs["qwz"]["gathers"]
    assert g["params_quantized"] > 0 and g["gather_calls"] > 0, g
    assert report["deviation"]["qwz"]["max"] > 0, "qwz's losses equal bf16's: nothing was quantized"
    assert runs["bf16"]["losses"][-1] < runs["bf16"]["losses"][0], "the loss did not fall on the smooth fields"
    x = torch.randn(4096) * 0.02
    q = TorchQuantizerOps()
    qx, s = q.quantize(x.half(), 4, 8, q.Symmetric)
    y = q.dequantize(qx, s, 4, 8, q.Symmetric).float()
    # the largest magnitude of each group maps to +-128 -> clamped to 127 when positive: error <= absmax / 128
    assert (y - x).abs().max() <= x.abs().max() / 128 + 1e-3, float((y - x).abs().max())
    report["smoke_checks"] = "passed"
    print("smoke checks passed: the qwz run quantized every fetched weight and its loss moved off bf16's", flush=True)


if __name__ == "__main__":
    sys.exit(main())
