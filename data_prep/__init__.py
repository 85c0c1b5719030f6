"""Offline tools that shard an image corpus into WebDataset tars (local or object storage).

    python data_prep/shard.py INPUT... --output s3://bucket/prefix     # or: xtra-shard
    python data_prep/finalize.py --output s3://bucket/prefix           # after a job array
    python data_prep/verify.py --output s3://bucket/prefix             # re-read and check

They share only ``xtra_ds.data.format`` with training; training never imports them.
"""

__version__ = "0.1.0"
