"""Per-image processing: decode check, orientation, RGB, resize, re-encode — or a reason to reject.

Rejection reasons (the manifest counts them): ``empty``, ``file_too_large``, ``not_an_image``,
``too_many_pixels`` (decompression bombs), ``truncated``, ``unreadable`` (undecodable, or a server
that refused it on every try: 403, 500, …), ``too_small``, ``duplicate`` (decided by the caller),
``read_error`` (not found), ``no_label`` (an unlabelled file in a labelled tree), ``not_allowed``
(a list entry outside the sources policy, never read).
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from xtra_ds.data.format import MAX_SAMPLE_BYTES

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a rejection, never half an image


@contextmanager
def pixel_guard(max_pixels: int):
    """PIL's decompression-bomb guard at least as high as our own limit, only while we open an image:
    :func:`process` checks the pixel count itself before decoding, and everyone else in the process
    keeps PIL's guard as it was."""
    saved = Image.MAX_IMAGE_PIXELS
    if saved is not None:
        Image.MAX_IMAGE_PIXELS = max(saved, max_pixels // 2 + 1)  # PIL refuses at twice its limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@dataclass(frozen=True)
class Settings:
    """What decides the bytes of every output sample (hashed into the plan)."""

    max_side: int = 384  # shorter side at most this many pixels after resizing (0 = never resize)
    quality: int = 90  # JPEG quality of re-encoded images
    min_side: int = 32  # smaller images are rejected
    max_pixels: int = 64_000_000  # more pixels than this is rejected before decoding (bombs)
    max_bytes: int = MAX_SAMPLE_BYTES  # larger files are rejected unread (and the loader refuses larger members)
    passthrough: bool = True  # keep the original bytes of a JPEG that needs no change
    # images that are not JPEG stay lossless: written as PNG (a PNG that needs no change byte for byte), never
    # re-encoded as JPEG. Benchmarks set it (data_prep.benchmarks): their PNG and array images are the test data
    lossless: bool = False
    # of inputs with the same bytes only the earliest is written; benchmarks keep every image they list (a test
    # set is counted as published)
    dedupe: bool = True


@dataclass
class Result:
    data: bytes | None  # encoded output (None when rejected)
    ext: str = "jpg"
    reason: str | None = None  # rejection reason
    detail: str = ""
    width: int = 0  # original size
    height: int = 0
    mode: str = ""
    fmt: str = ""


def reject(reason: str, detail: str = "", **kw) -> Result:
    return Result(None, reason=reason, detail=detail[:300], **kw)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any mode: alpha composited on white, palettes expanded, 16-bit and float scaled."""
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        im = im.convert("I")
    if im.mode == "I":  # 16/32-bit integer grey: scale the used range to 8 bits
        lo, hi = im.getextrema()
        scale = 255.0 / max(1, hi) if hi > 255 else 1.0
        im = im.point(lambda v: v * scale).convert("L")
    elif im.mode == "F":
        im = im.point(lambda v: min(255.0, max(0.0, v))).convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK (PIL inverts Adobe CMYK on load), YCbCr, LAB, HSV


def process(raw: bytes, s: Settings) -> Result:
    """Check, normalise and encode one image's bytes."""
    if not raw:
        return reject("empty", "zero bytes")
    if len(raw) > s.max_bytes:
        return reject("file_too_large", f"{len(raw)} bytes > max_bytes {s.max_bytes}")
    with pixel_guard(s.max_pixels):
        return _process(raw, s)


def _process(raw: bytes, s: Settings) -> Result:
    try:
        im = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as e:
        return reject("too_many_pixels", str(e))
    except UnidentifiedImageError:
        # what it is, never its bytes: a source that is not an image may hold anything (a page, a secret)
        head = raw[:64].lstrip().lower()
        what = "an HTML page" if head.startswith((b"<!doctype html", b"<html")) else "not image data"
        return reject("not_an_image", f"{what} ({len(raw)} bytes)")
    except Exception as e:
        return reject("unreadable", f"{type(e).__name__}: {e}")
    w, h = im.size
    info = dict(width=w, height=h, mode=im.mode, fmt=im.format or "")
    if w * h > s.max_pixels:
        return reject("too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels {s.max_pixels}", **info)
    if min(w, h) < s.min_side:
        return reject("too_small", f"{w}x{h}: shorter side < min_side {s.min_side}", **info)
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    rotate = orientation not in (None, 1)
    oriented = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    short = min(oriented)
    resize = bool(s.max_side) and short > s.max_side
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with transparency…": handled in to_rgb
            unchanged = im.mode == "RGB" and not rotate and not resize and s.passthrough
            if im.format == "JPEG" and unchanged:
                im.load()  # full decode: proves the file is whole
                return Result(raw, "jpg", **info)
            if s.lossless and im.format == "PNG" and unchanged and getattr(im, "n_frames", 1) == 1:
                im.load()
                return Result(raw, "png", **info)
            if resize and im.format == "JPEG":
                # DCT-domain downscaling (by 1/2, 1/4, 1/8) while keeping >= 2x the target size:
                # much faster, and the final high-quality resize below hides the difference.
                factor = short / s.max_side
                im.draft("RGB", (int(w / factor * 2), int(h / factor * 2)))
            im.load()
            if im.format == "GIF" or getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im = ImageOps.exif_transpose(im) if rotate else im
            im = to_rgb(im)
            if resize:
                cw, ch = im.size
                f = s.max_side / min(cw, ch)
                im = im.resize((max(1, round(cw * f)), max(1, round(ch * f))), Image.BICUBIC, reducing_gap=None)
            out = io.BytesIO()
            if s.lossless and info["fmt"] != "JPEG":
                im.save(out, "PNG")
                return Result(out.getvalue(), "png", **info)
            im.save(out, "JPEG", quality=s.quality)
    except OSError as e:
        msg = str(e)
        if any(s in msg.lower() for s in ("truncated", "broken data stream", "unrecognized data stream")):
            return reject("truncated", msg, **info)
        return reject("unreadable", f"{type(e).__name__}: {msg}", **info)
    except Exception as e:  # any decoder failure is this input's problem, never the job's
        return reject("unreadable", f"{type(e).__name__}: {e}", **info)
    return Result(out.getvalue(), "jpg", **info)
