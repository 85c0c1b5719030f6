"""Small helpers with no better home."""

from __future__ import annotations

import logging

log = logging.getLogger("xtra_ds")


def pil_info() -> str:
    """Which imaging library ``PIL`` is: pillow-simd or stock Pillow, with its version and codecs."""
    import PIL
    from PIL import features

    version = PIL.__version__
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            name = f"pillow-simd {dist_version('pillow-simd')}"
        except PackageNotFoundError:
            name = f"Pillow {version}"
    except ImportError:  # pragma: no cover
        name = f"PIL {version}"
    codecs = [c for c in ("jpg", "zlib", "webp", "libtiff") if features.check(c)]
    turbo = features.check_feature("libjpeg_turbo") if "jpg" in codecs else False
    return f"{name} (codecs: {', '.join(codecs)}{'; libjpeg-turbo' if turbo else ''})"
