#!/usr/bin/env bash
# The GPU measurements in one command, for a machine with one GPU, a python3 that has torch (CUDA) and no
# network; about 6 minutes (TOTAL seconds, default 345), every section under its own budget and timeout,
# each writing its JSON as it goes (a stop loses nothing measured). From the repository root:
#
#   OUT=/path/to/out bash bench/run_gpu.sh          # OUT defaults to ./bench_gpu_out
#   TOTAL=240 bash bench/run_gpu.sh                 # a shorter run: the lower sections shrink or drop
#
#   0. install from .gpu_wheels/ what python3 lacks (DeepSpeed and what it and xtra_ds import); start
#      DeepSpeed's quantizer JIT build (ninja + nvcc) in the background, on the other half of the cores
#   1. bench/bench_gpu_stages.py: XTRA-H/14 at micro batch 32 under ZeRO-0, 2, 3, ZeRO-3 with one gather per
#      block (leaf_module), ZeRO-3 with nothing fetched, and plain PyTorch: img/s, MFU, memory  (~150 s)
#   2. bench/bench_gpu_qwz.py: bf16 vs ZeRO++ qwZ loss over 50 steps (and a reseeded bf16 run for scale)  (~100 s)
#   3. the communication model's table for H/14 at 72 GPUs (no GPU work), then, with what time is left,
#      bench/bench_gpu.py: attention variants and micro batch 64 on the ZeRO-3 engine
#   4. a summary of all of it: $OUT/summary.txt (and the end of the log)
#
# $OUT gets at most 8 files: bench_gpu.log (everything printed), stages.json, qwz_loss.json, bench_gpu.json,
# quantizer_build.json, quantizer_build.log, summary.txt.
#
# .gpu_wheels/ is ignored by git; build it on a machine with network, then carry it with the repository
# (WHEELS=dir points elsewhere). It was made with (deepspeed: the version in .venv; the rest: what
# `import deepspeed` and xtra_ds's imports need beyond torch, numpy, pyyaml, pillow, tensorboard, psutil,
# einops, msgpack, ninja, py-cpuinfo, packaging, tqdm, fsspec):
#   DS_ACCELERATOR=cuda DS_BUILD_OPS=0 .venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation \
#       deepspeed==0.19.8 -w .gpu_wheels
#   .venv/bin/pip download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu_wheels hjson==3.1.0 \
#       pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#       typing-extensions==4.16.0 braceexpand==0.1.7 webdataset==1.0.2 setuptools==84.2.1
# (5.8 MB. deepspeed is a py3-none-any wheel without compiled ops; only qwZ's quantizer is JIT-built, and
# section 2 falls back to its torch stand-in if that build fails; the optimizer is torch's AdamW.
# setuptools is installed only if missing: torch.utils.cpp_extension needs it for the JIT build.)
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL=${TOTAL:-345}
OUT=${OUT:-$PWD/bench_gpu_out}
WHEELS=${WHEELS:-.gpu_wheels}
mkdir -p "$OUT"
LOG=$OUT/bench_gpu.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export DS_BUILD_OPS=0 DS_ACCELERATOR=cuda DS_SKIP_CUDA_CHECK=1   # no op prebuilt; the quantizer is JIT-built
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_bench_gpu}
# one directory and one arch list for the background build and section 2's load: the same flags, so the
# load finds the build instead of starting another
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/xtra_torch_extensions}
SITE=/tmp/gpu_wheels_site   # used only if pip cannot install into $PY's environment
left() { echo $((TOTAL - (SECONDS - START))); }
stamp() { echo "== [$((SECONDS - START)) s] $*"; }

stamp "$(date -u +%FT%TZ) $(hostname)  repo $(git rev-parse --short HEAD 2>/dev/null || echo '?')  OUT=$OUT"
timeout 20 nvidia-smi || echo "(nvidia-smi failed)"
# DeepSpeed's quantizer is JIT-built by torch.utils.cpp_extension, which takes CUDA_HOME as nvcc's ../.. when
# unset: wrong for a wrapper script (e.g. /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc). Name the real
# toolkit: the first that has nvcc and cuda_runtime.h.
if [ -z "${CUDA_HOME:-}" ]; then
    NVCC_DIR=$(dirname "$(dirname "$(command -v nvcc || echo /nonexistent/bin/nvcc)")")
    for d in /usr/local/cuda /usr/local/cuda-* "$NVCC_DIR"; do
        if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then export CUDA_HOME=$d; break; fi
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-?}: $("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | tail -2 | tr '\n' ' ')"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    CC=$(timeout 10 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    export TORCH_CUDA_ARCH_LIST=${CC:-9.0}
fi
# DeepSpeed 0.19.8's op builder parses each entry as numbers ("9.0", "9.0+PTX") and fails on the arch-specific
# "9.0a" that some images preset (seen on an H200 machine: the quantizer build stopped at once)
export TORCH_CUDA_ARCH_LIST=$(printf '%s' "$TORCH_CUDA_ARCH_LIST" | sed -E 's/([0-9])[a-z]+/\1/g')

stamp "install from $WHEELS (only what $PY lacks)"
rm -rf "$SITE"   # only this run's unpacked wheels go onto PYTHONPATH (another Python's would shadow this one's)
timeout -k 5 90 "$PY" - "$SITE" "$WHEELS" <<'PYEOF'
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

site, wheel_dir = Path(sys.argv[1]), Path(sys.argv[2])
wheels = {re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower(): f for f in wheel_dir.glob("*.whl")}


def have(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def vt(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# deepspeed 0.19.8's requirements (its METADATA): einops hjson msgpack ninja numpy packaging>=20 psutil
# py-cpuinfo pydantic>=2 torch tqdm; pydantic 2.14.4 pins pydantic-core 2.50.5 and wants annotated-types>=0.6,
# typing-inspection>=0.4.4, typing-extensions>=4.16 (only when pydantic itself is installed from here).
# xtra_ds imports webdataset (and braceexpand) at module level; torch.utils.cpp_extension needs setuptools.
reqs = [("deepspeed", "0.19.8"), ("hjson", None), ("packaging", "20"), ("einops", None), ("msgpack", None),
        ("ninja", None), ("psutil", None), ("py-cpuinfo", None), ("tqdm", None), ("numpy", None),
        ("pyyaml", None), ("pillow", None), ("braceexpand", None), ("webdataset", None), ("setuptools", None)]
if have("pydantic") is None or vt(have("pydantic")) < (2,):
    reqs += [("pydantic", "2.14.4"), ("pydantic-core", "2.50.5"), ("annotated-types", "0.6"),
             ("typing-inspection", "0.4.4"), ("typing-extensions", "4.16")]
todo = []
for dist, minimum in reqs:
    v = have(dist)
    if dist == "pillow" and v is None:
        v = have("pillow-simd")
    ok = v is not None and (minimum is None or vt(v) >= vt(minimum))
    if dist == "pydantic-core" and v is not None:
        ok = v == minimum  # pinned exactly by the pydantic we install
    if ok:
        print(f"  {dist} {v}: present")
    elif dist in wheels:
        print(f"  {dist} {v or '-'}: install {wheels[dist].name}")
        todo.append(wheels[dist])
    else:
        print(f"  {dist} {v or '-'}: MISSING and no wheel in {wheel_dir}")
if todo:
    files = [str(f) for f in todo]
    tries = [[sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-warn-script-location",
              "--disable-pip-version-check", *files],
             ["uv", "pip", "install", "--python", sys.executable, "--no-index", "--no-deps", *files]]
    for cmd in tries:
        try:
            if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
                print(f"  installed with {cmd[0]} {cmd[1]} {cmd[2]}")
                break
        except FileNotFoundError:
            pass
    else:  # no pip, or a read-only environment: unpack the wheels onto PYTHONPATH instead
        site.mkdir(parents=True, exist_ok=True)
        for f in todo:
            zipfile.ZipFile(f).extractall(site)
        print(f"  pip unavailable: unpacked {len(todo)} wheel(s) into {site} (PYTHONPATH)")
PYEOF
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
"$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

versions = []
for d in ("torch", "triton", "deepspeed", "pydantic", "pydantic-core", "hjson", "typing-extensions", "numpy",
          "setuptools", "webdataset"):
    try:
        versions.append(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        versions.append(f"{d} -")
print("  python", sys.version.split()[0], sys.executable, "|", ", ".join(versions))
PYEOF

# The quantizer's binding includes ATen/cuda/CUDAContext.h, which wants cuSPARSE, cuBLAS and cuSOLVER headers;
# a toolkit of nvcc and the runtime alone lacks them, and torch's own nvidia-* packages may carry them.
if [ -n "${CUDA_HOME:-}" ] && [ ! -f "$CUDA_HOME/include/cusparse.h" ]; then
    NV_INC=$(timeout 30 "$PY" - <<'PYEOF'
import glob
import os
import sysconfig

roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
found = {os.path.dirname(p) for r in roots for h in ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")
         for p in glob.glob(os.path.join(r, "nvidia", "**", "include", h), recursive=True)}
print(":".join(sorted(found)))
PYEOF
)
    if [ -n "$NV_INC" ]; then export CPATH="$NV_INC${CPATH:+:$CPATH}"; fi
    echo "no cusparse.h in $CUDA_HOME/include; from torch's nvidia packages: ${NV_INC:-none found}"
fi

# Half the cores each for the benchmarks and the background build, when there are enough (16 on the H200
# machine), so that nvcc does not slow the benchmarks' Python (ZeRO-3's hooks are host work).
NCPU=$(nproc 2>/dev/null || echo 1)
BENCH_CPUS=() BUILD_CPUS=()
if command -v taskset >/dev/null && [ "$NCPU" -ge 8 ]; then
    BENCH_CPUS=(taskset -c "0-$((NCPU / 2 - 1))") BUILD_CPUS=(taskset -c "$((NCPU / 2))-$((NCPU - 1))")
fi
export MAX_JOBS=${MAX_JOBS:-$(( NCPU >= 8 ? NCPU / 2 : 1 ))}
QBUILD_S=${QBUILD_S:-270}
stamp "DeepSpeed's quantizer: JIT build in the background (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs, ${QBUILD_S} s at most, ${BUILD_CPUS[*]:-no pinning}) -> quantizer_build.log"
QSTATUS=$OUT/quantizer_build.json QPIDFILE=/tmp/xtra_quantizer_build.pid
rm -f "$QSTATUS" "$QPIDFILE"
(   # timeout makes its own process group and passes a TERM on to it: stopping timeout stops ninja and nvcc too
    timeout -k 5 "$QBUILD_S" ${BUILD_CPUS[@]+"${BUILD_CPUS[@]}"} "$PY" bench/bench_gpu_qwz.py --build-quantizer \
        --status "$QSTATUS" &
    echo $! > "$QPIDFILE"
    wait $!
    rc=$?
    [ -f "$QSTATUS" ] || printf '{"ok": false, "error": "the build exited (%s) before writing its status: see quantizer_build.log"}\n' \
        "$rc" > "$QSTATUS"   # section 2 stops waiting for it
) > "$OUT/quantizer_build.log" 2>&1 &

rc1=0 rc2=0
S1=$(( $(left) - 140 )); [ "$S1" -gt 165 ] && S1=165   # 140: section 2's budget and stops
if [ "$S1" -ge 60 ]; then
    stamp "1. ZeRO stages on XTRA-H/14, micro batch 32 (budget $S1 s)"
    timeout -k 10 $((S1 + 30)) ${BENCH_CPUS[@]+"${BENCH_CPUS[@]}"} "$PY" bench/bench_gpu_stages.py --budget "$S1" --out "$OUT/stages.json"
    rc1=$?
else
    stamp "1. skipped: $(left) s left"
fi

S2=$(( $(left) - 25 )); [ "$S2" -gt 110 ] && S2=110
if [ "$S2" -ge 60 ]; then
    stamp "2. bf16 vs qwZ loss curves (budget $S2 s)"
    timeout -k 10 $((S2 + 25)) ${BENCH_CPUS[@]+"${BENCH_CPUS[@]}"} "$PY" bench/bench_gpu_qwz.py --budget "$S2" --out "$OUT/qwz_loss.json" \
        --jit-status "$OUT/quantizer_build.json" --jit-wait 45
    rc2=$?
else
    stamp "2. skipped: $(left) s left"
fi
if [ -f "$QPIDFILE" ] && kill -0 "$(cat "$QPIDFILE")" 2>/dev/null; then  # no longer needed: stop it
    stamp "stopping the quantizer build (still running)"
    kill -TERM "$(cat "$QPIDFILE")" 2>/dev/null
fi

stamp "3a. communication model: XTRA-H/14 at the paper's scale (predicted; no GPU work)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 30 "$PY" launchers/plan_cluster.py \
    --config ds_configs/xtra_vit_h14_in21k.yaml  # a launcher: the repository goes on the path (not installed there)

S3=$(( $(left) - 20 ))
if [ "$S3" -ge 75 ]; then
    stamp "3b. attention variants and micro batch 64 on the ZeRO-3 engine (budget $S3 s)"
    timeout -k 10 $((S3 + 20)) ${BENCH_CPUS[@]+"${BENCH_CPUS[@]}"} "$PY" bench/bench_gpu.py --budget "$S3" --grace 10 --no-plain \
        --alts sdpa_cudnn flex --sweep 64 --warmup 2 --steps 8 --variant-cap 8 --out "$OUT/bench_gpu.json" \
        || echo "(bench_gpu.py: exit $?)"
else
    stamp "3b. skipped (attention variants, batch sweep): $(left) s left"
fi

stamp "4. summary"
timeout 20 "$PY" - "$OUT" > "$OUT/summary.txt" <<'PYEOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as e:
        print(f"{name}: not there ({type(e).__name__})")
        return None


s = load("stages.json")
if s:
    print(f"1. {s['model']} @ {s['sizes']['img_size']}px, micro batch {s['micro_batch']}, {s['precision']}, "
          f"checkpointing {s['grad_checkpointing']}, drop path {s['drop_path']}; "
          f"{s['env'].get('device_name', '?')}, torch {s['env']['torch']}, deepspeed {s['env']['deepspeed']}")
    print(s.get("table", "(no table)"))
q = load("qwz_loss.json")
if q:
    print(f"\n2. bf16 vs qwZ: {q['model']}, {q['steps']} steps of {q['micro_batch']} smooth-field images")
    print(q.get("summary", "(no summary)"))
b = q.get("quantizer_build") if q else None
b = b or load("quantizer_build.json")
if b:
    print(f"DeepSpeed's quantizer JIT build: {'ok' if b.get('ok') else 'not built'} after {b.get('seconds', '?')} s"
          + ("" if b.get("ok") else f" ({b.get('error', '?').strip().splitlines()[-1][:200]})"))
g = load("bench_gpu.json")
if g:
    print("\n3. attention variants / micro batch (ZeRO-3 engine)")
    print(g.get("table", "(no table)"))
PYEOF
cat "$OUT/summary.txt"
stamp "done: exit ${rc1}/${rc2} (sections 1/2); $(ls "$OUT" | wc -l) files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log is complete before the command returns
[ "$rc1" -eq 0 ] && [ "$rc2" -eq 0 ]
