"""Merging checkpoints: the streaming engine, its pre-passes, YAML configs, checkpoints on disk, model cards."""
