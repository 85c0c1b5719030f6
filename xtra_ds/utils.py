"""Small helpers with no better home."""

from __future__ import annotations

import logging

log = logging.getLogger("xtra_ds")


def pil_info() -> str:
    """Which imaging library ``PIL`` is: pillow-simd or stock Pillow, with its version and codecs."""
    import PIL
    from PIL import features

    from importlib.metadata import PackageNotFoundError, version as dist_version

    version = PIL.__version__
    # Judge by the code that imports, not by metadata: `pip install` of anything that needs
    # "pillow" puts stock Pillow's files over pillow-simd's while both stay listed.
    try:
        simd = dist_version("pillow-simd") == version
    except PackageNotFoundError:
        simd = False
    name = f"pillow-simd {version}" if simd else f"Pillow {version}"
    codecs = [c for c in ("jpg", "zlib", "webp", "libtiff") if features.check(c)]
    turbo = features.check_feature("libjpeg_turbo") if "jpg" in codecs else False
    return f"{name} (codecs: {', '.join(codecs)}{'; libjpeg-turbo' if turbo else ''})"
