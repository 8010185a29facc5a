"""Where epserve keeps what it makes on first use (the built-in model, compiled kernels, benchmark
checkpoints): ``$EPSERVE_CACHE``, by default ``~/.cache/epserve``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("EPSERVE_CACHE") or Path.home() / ".cache" / "epserve")
