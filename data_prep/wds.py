"""webdataset, imported for data_prep without PyTorch.

webdataset imports torch when it can (for its DataLoader helpers, which data_prep never uses);
in a shard worker that would cost every process ~1–2 s and ~250 MB. So the first import here hides
torch from webdataset — unless the process has torch already, in which case nothing changes.
"""

from __future__ import annotations

import sys


def _import_webdataset():
    if "torch" in sys.modules:
        import webdataset
        return webdataset
    sys.modules["torch"] = None  # "import torch" fails: webdataset falls back to its torch-free stubs
    try:
        import webdataset
    finally:
        del sys.modules["torch"]
    return webdataset


webdataset = _import_webdataset()
TarWriter = webdataset.TarWriter
tar_file_iterator = webdataset.tariterators.tar_file_iterator
group_by_keys = webdataset.tariterators.group_by_keys
