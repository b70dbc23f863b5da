"""Small utilities shared by every part of the project (EDM2-compatible names)."""

from .util import EasyDict, make_cache_dir_path
