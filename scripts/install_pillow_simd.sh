#!/usr/bin/env bash
# Replace Pillow with pillow-simd (same `PIL` API, SIMD resize/convert kernels) in $VENV.
# pillow-simd ships no wheels, so it is compiled here: with AVX2 where the CPU has it, SSE4
# otherwise. If the build fails, stock Pillow is put back and the reason is printed; the
# program logs which library it runs on (xtra_ds.data.format.pil_info).
set -uo pipefail
VENV=${VENV:-.venv}
SPEC=${PILLOW_SIMD_SPEC:-pillow-simd==12.1.1.post0}
# (the grep drops pip's notes about unreadable local index folders of some machines)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither' >&2); }

# WebP and TIFF support need their headers at build time. Install them when we may
# (root with apt-get, e.g. CI or a container); otherwise say what is missing.
missing=()
[ -e /usr/include/webp/decode.h ] || missing+=(libwebp-dev)
[ -e /usr/include/x86_64-linux-gnu/tiff.h ] || [ -e /usr/include/tiff.h ] || missing+=(libtiff-dev)
[ -e /usr/include/jpeglib.h ] || [ -e /usr/include/x86_64-linux-gnu/jpeglib.h ] || missing+=(libjpeg-dev)
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "[pillow-simd] installing build headers: ${missing[*]}"
        (apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || \
         (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1)) || \
            echo "[pillow-simd] could not install ${missing[*]}; building without them"
    else
        echo "[pillow-simd] missing headers: ${missing[*]} (install them, e.g. 'sudo apt-get install ${missing[*]}', for full codec support)"
    fi
fi

flags="-msse4"
if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then flags="-mavx2"; fi
echo "[pillow-simd] building $SPEC with CC='cc $flags' (about 30 s)"
log=$(mktemp)
# Both go first: in a refreshed environment an earlier pillow-simd may still be registered while
# Pillow's files overwrote its own, and pip would then call pillow-simd "already satisfied".
if pip uninstall -y -q pillow pillow-simd >"$log" 2>&1 && \
   CC="cc $flags" pip install -q --no-cache-dir --no-binary :all: "$SPEC" >>"$log" 2>&1 && \
   "$VENV/bin/python" -c "from PIL import Image, features; assert features.check('jpg') and features.check('zlib')" >>"$log" 2>&1; then
    echo "[pillow-simd] installed ($flags)"
else
    echo "[pillow-simd] build failed; falling back to stock Pillow. Last lines of the build log:"
    tail -n 15 "$log" | sed 's/^/    /'
    pip uninstall -y -q pillow-simd >/dev/null 2>&1
    pip install -q "pillow>=10"
fi
rm -f "$log"
