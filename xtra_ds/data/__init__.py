"""Data: the shard format shared with data_prep/, and the streaming loaders.

    shards = resolve("s3://bucket/in1k/train/manifest.json", {"endpoint_url": ...})
    loader = TrainLoader(TrainSpec(shards, global_batch=2088, img_size=224, rank=r, world_size=w))
    for batch in loader:  # this rank's share of a step: {"images": uint8 [n, H, W, 3], "labels", "keys", …}
        x = normalize_on_device(batch["images"].cuda(non_blocking=True), torch.bfloat16)
"""

_LAZY = {"TrainLoader": "train_loader", "TrainSpec": "train_loader", "eval_batches": "eval_loader",
         "ShardReadError": "remote", "Shard": "shards", "resolve": "shards", "shard_urls": "shards",
         "use_fsspec_in_webdataset": "shards", "normalize_on_device": "transforms", "keys_digest": "provenance"}
__all__ = list(_LAZY)


def __getattr__(name):
    # Lazy: data_prep imports xtra_ds.data.format and must not pull in torch.
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
