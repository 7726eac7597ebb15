"""Checkpoint I/O: lazy readers for every common checkpoint form, and streaming sharded output."""

from __future__ import annotations

from .formats import DTYPE_NAMES as DTYPE_NAMES
from .formats import read_header as read_header
from .readers import Checkpoint as Checkpoint
from .readers import open_checkpoint as open_checkpoint
from .readers import resolve_weight_files as resolve_weight_files
from .writer import DEFAULT_SHARD_BYTES as DEFAULT_SHARD_BYTES
from .writer import BackgroundWriter as BackgroundWriter
from .writer import ShardWriter as ShardWriter
from .writer import atomic_output_dir as atomic_output_dir
from .writer import copy_model_files as copy_model_files
from .writer import parse_size as parse_size

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DTYPE_NAMES",
    "BackgroundWriter",
    "Checkpoint",
    "ShardWriter",
    "atomic_output_dir",
    "copy_model_files",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "resolve_weight_files",
]
