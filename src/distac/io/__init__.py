"""Checkpoint I/O: lazy readers for every common checkpoint form, streaming sharded output, and the
input (:mod:`distac.io.inputs`) and output (:mod:`distac.io.atomic`) policies."""

from __future__ import annotations

from .atomic import atomic_dir as atomic_dir
from .atomic import atomic_file as atomic_file
from .atomic import check_output as check_output
from .formats import DTYPE_NAMES as DTYPE_NAMES
from .formats import read_header as read_header
from .inputs import inside_model as inside_model
from .inputs import open_regular as open_regular
from .inputs import require_regular as require_regular
from .readers import Checkpoint as Checkpoint
from .readers import open_checkpoint as open_checkpoint
from .readers import resolve_weight_files as resolve_weight_files
from .writer import DEFAULT_SHARD_BYTES as DEFAULT_SHARD_BYTES
from .writer import BackgroundWriter as BackgroundWriter
from .writer import ShardWriter as ShardWriter
from .writer import copy_model_files as copy_model_files
from .writer import parse_size as parse_size
from .writer import update_model_config as update_model_config
from .writer import write_safetensors as write_safetensors

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
    "inside_model",
    "open_checkpoint",
    "open_regular",
    "parse_size",
    "read_header",
    "require_regular",
    "resolve_weight_files",
    "update_model_config",
    "write_safetensors",
]
