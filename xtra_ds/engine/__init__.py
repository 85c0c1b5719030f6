"""Training machinery: schedules and optimizer groups (DeepSpeed wiring joins here)."""
