"""Training machinery: builder (config -> DeepSpeed engine), trainer loop, checkpoints, metrics,
exports and consolidation, schedule. ``launchers/pretrain.py`` is the entry point."""
