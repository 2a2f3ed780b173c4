"""Stage 4, build: one code artifact (`lib.so`, no weights inside) per target profile.

CPU profiles go through our CPU pipeline (fusion plus a rule-based default schedule, or tuning
records where they exist); CUDA profiles through TVM's CUDA pipeline with DLight GPU schedules,
their kernels compiled ahead of time to a fatbin by nvcc (compiler/kernels/cuda.py).
ARM libraries are linked with the profile's cross compiler.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvmdeploy.targets import Profile

from .errors import ToolMissingError


@dataclass
class BuildResult:
    profile: Profile
    lib_path: Path
    target: dict[str, Any]  # the TVM target dict actually used
    code_form: str  # "shared-library" (CPU) or "cuda-source-in-library" / "cuda-fatbin"
    seconds: float
    precision: str = "float32"  # what verification's tolerance and the manifest say


def tvm_target(profile: Profile, num_cores: int | None = None):
    """The TVM Target for a profile; `num_cores` is what MetaSchedule's cost model assumes."""
    import tvm

    spec = dict(profile.target)
    if num_cores and spec["kind"] == "llvm":
        spec["num-cores"] = num_cores
    if profile.host:
        return tvm.target.Target(spec, host=dict(profile.host))
    return tvm.target.Target(spec)


def relax_pipeline(profile: Profile, target, database=None):
    from tvm import relax

    if profile.family == "cuda":
        return relax.get_default_pipeline(target)
    from .kernels.cpu_schedule import cpu_pipeline

    return cpu_pipeline(target) if database is None else cpu_pipeline(target, database=database)


def build_artifact(
    mod,
    profile: Profile,
    out_dir: str | Path,
    database=None,
    precision: str = "float32",
    pipeline=None,
) -> BuildResult:
    """Compile `mod` (all bucket functions) for `profile` into `out_dir/lib.so`; `precision` is
    what `mod` was made for (quantize.py rewrites it before this stage). `pipeline` replaces the
    encoder pipeline (decoders bring their own: decoder/lower.py)."""
    import time

    import tvm

    start = time.perf_counter()
    if profile.cross_cc and shutil.which(profile.cross_cc.split()[0]) is None:
        raise ToolMissingError(
            f"{profile.name}: its code is linked by {profile.cross_cc!r}, which is not on PATH; "
            "install it (Debian: gcc-aarch64-linux-gnu) or leave this profile out"
        )
    target = tvm_target(profile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline or relax_pipeline(profile, target, database)
    lib_path = out_dir / "lib.so"
    if profile.family == "cuda":  # kernels ahead of time with nvcc (compiler/kernels/cuda.py)
        from .kernels.cuda import compile_and_export

        code_form = compile_and_export(mod, target, pipeline, profile.target["arch"], lib_path)
        return BuildResult(
            profile,
            lib_path,
            dict(profile.target),
            code_form,
            time.perf_counter() - start,
            precision,
        )
    executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    if profile.cross_cc:
        from tvm.support import cc

        executable.export_library(str(lib_path), fcompile=cc.cross_compiler(profile.cross_cc))
    else:
        executable.export_library(str(lib_path))
    return BuildResult(
        profile,
        lib_path,
        dict(profile.target),
        "shared-library",
        time.perf_counter() - start,
        precision,
    )
