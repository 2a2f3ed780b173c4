"""The demo's bundles, compiled once: a bundle is reused while the key of what shaped it holds.

The key (model digest, profile, precisions, ...) is stamped beside the bundle after a complete
compile; a changed key, a missing stamp or a bundle that no longer verifies compiles it again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.atomic import write_json_atomic
from tvmdeploy.runtime.bundle import Bundle
from tvmdeploy.runtime.errors import BundleError

logger = logging.getLogger(__name__)


def cached_bundle(bundle_dir: Path, key: dict[str, Any], compile_it: Callable[[], Any]) -> Path:
    """`bundle_dir`, compiled by `compile_it()` unless a bundle made with this `key` is there."""
    stamp = bundle_dir.parent / f".{bundle_dir.name}.key.json"
    try:
        Bundle(bundle_dir).verify()
        if json.loads(stamp.read_text()) == key:
            logger.info("bundle: cached at %s", bundle_dir)
            return bundle_dir
    except (BundleError, OSError, json.JSONDecodeError):
        pass
    compile_it()
    write_json_atomic(stamp, key)
    return bundle_dir
