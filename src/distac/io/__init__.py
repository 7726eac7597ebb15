"""Checkpoint I/O: lazy readers for every common checkpoint form, and streaming sharded output."""

from __future__ import annotations

from .atomic import atomic_dir as atomic_dir
from .atomic import atomic_file as atomic_file
from .atomic import check_output as check_output
from .formats import DTYPE_NAMES as DTYPE_NAMES
from .formats import read_header as read_header
from .readers import Checkpoint as Checkpoint
from .readers import open_checkpoint as open_checkpoint
from .readers import resolve_weight_files as resolve_weight_files
from .writer import DEFAULT_SHARD_BYTES as DEFAULT_SHARD_BYTES
from .writer import BackgroundWriter as BackgroundWriter
from .writer import ShardWriter as ShardWriter
from .writer import copy_model_files as copy_model_files
from .writer import parse_size as parse_size

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "DTYPE_NAMES",
    "BackgroundWriter",
    "Checkpoint",
    "ShardWriter",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "copy_model_files",
    "open_checkpoint",
    "parse_size",
    "read_header",
    "resolve_weight_files",
]
