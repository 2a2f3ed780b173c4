"""Write a file so that a reader, a crash or `kill -9` sees the old file or the whole new one.

The content goes to a temporary file in the same directory, then `os.replace` swaps it in (atomic
on POSIX within one file system). Every JSON and text file tvmdeploy writes outside a bundle goes
through here; bundles are staged whole by the compiler's package stage.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644) -> Path:
    """Replace `path` with `text` in one step; the parent directory is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)  # mkstemp makes it private; these files are shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1, sort_keys: bool = False) -> Path:
    """`obj` as JSON, written atomically (see `write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))
