"""Evaluation of frozen encoders: probes, the asynchronous eval worker, the offline protocol."""
