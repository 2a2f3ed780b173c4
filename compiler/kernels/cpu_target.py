"""What the rule-based CPU schedules need to know about a target: SIMD width, register count.

Shared by the matmul rule (cpu_matmul.py), the row-reduction and injective rules (cpu_rules.py)
and weight packing, so every kernel sizes itself for the same vector width.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.target import Target


def cpu_features(target: Target) -> set[str]:
    try:
        from tvm.target.codegen import llvm_get_cpu_features

        return {str(f) for f in llvm_get_cpu_features(target)}
    except Exception:  # noqa: BLE001 - best effort, never fail the build
        return set()


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's widest vector unit (16 for avx512, 8 for avx2, 4 for
    neon/sve/generic)."""
    if target.kind.name != "llvm":
        return 4
    feats = cpu_features(target)
    if "avx512f" in feats:
        return 16
    if "avx2" in feats or "avx" in feats:
        return 8
    # NEON, SVE (scalable; scheduled as 128-bit fixed), SSE, RVV, unknown.
    return 4


def num_vector_registers(target: Target) -> int:
    feats = cpu_features(target)
    mtriple = str(target.attrs.get("mtriple", "") or "")
    if "avx512f" in feats or "neon" in feats or "sve" in feats or mtriple.startswith("aarch64"):
        return 32
    return 16


def register_rows(target: Target, vectors_per_row: int) -> int:
    """Rows of a GEMM register tile: as many rows of `vectors_per_row` accumulators as the
    register file holds with ~4 left for A and B, at most 8 (6 on AVX2 at two vectors a row)."""
    return max(1, min(8, (num_vector_registers(target) - 4) // max(1, vectors_per_row)))


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of `n` that is at most `limit` (a tile that divides an extent)."""
    return next(d for d in range(min(limit, n), 0, -1) if n % d == 0)


def const_int(x) -> int | None:
    if isinstance(x, int):
        return x
    if isinstance(x, tirx.IntImm):
        return int(x.value)
    return None


def loop_extent(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV) -> int | None:
    return const_int(sch.get(loop).extent)
