"""Where tvmdeploy keeps per-user state: one cache directory, for the runtime and the compiler.

It holds the runtime's measured choices (`choices.json`), the tuner's records (`tuning/`) and the
arm64 sysroot that verifies ARM artifacts under QEMU (`arm64-sysroot/`).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TVMDEPLOY_CACHE_DIR`, else `$XDG_CACHE_HOME/tvmdeploy`, else `~/.cache/tvmdeploy`."""
    base = os.environ.get("TVMDEPLOY_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tvmdeploy"
    )
    return Path(base)
