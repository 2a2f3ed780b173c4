"""The AMX tile permission: Linux gives a process the tile state only when it asks for it.

Without `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` the first tile instruction of an
AMX artifact is SIGILL, so the runtime asks once per process, before any AMX artifact is
selected, and then checks with `ARCH_GET_XCOMP_PERM` that the kernel granted it. It never relies
on another library (ONNX Runtime's MLAS, PyTorch's oneDNN) having asked first. Where the kernel
refuses (EOPNOTSUPP on a CPU without AMX, EINVAL on a kernel older than 5.16, EPERM
under a seccomp policy), the state says why and the probe
(runtime/probe.py) reports it, so selection rejects AMX artifacts with that reason instead of
dying on a signal. Stdlib only: the runtime never imports the compiler.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import dataclass
from functools import cache

SYS_ARCH_PRCTL = 158  # x86-64 syscall number; other architectures use 158 for something else
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
GRANTED = "granted"

_REFUSALS = {
    errno.EOPNOTSUPP: "EOPNOTSUPP: this CPU has no AMX tile state",
    errno.EINVAL: "EINVAL: the kernel predates 5.16 (no ARCH_REQ_XCOMP_PERM)",
    errno.EPERM: "EPERM: a seccomp or container policy forbids arch_prctl",
    errno.ENOSYS: "ENOSYS: the kernel has no arch_prctl",
}


@dataclass(frozen=True)
class TilePermission:
    """Whether this process may execute tile instructions, and why not when it may not."""

    granted: bool
    detail: str  # GRANTED, or the refusal in words

    def __str__(self) -> str:
        return self.detail


def arch_prctl(code: int, arg: int) -> int:
    """The raw syscall: 0, or -errno. `arg` is an integer or an address (ARCH_GET_*)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(code), ctypes.c_ulong(arg))
    return -ctypes.get_errno() if result == -1 else int(result)


def _refusal(step: str, err: int) -> TilePermission:
    why = _REFUSALS.get(err, f"{errno.errorcode.get(err, err)}: {os.strerror(err)}")
    return TilePermission(False, f"AMX tile permission refused ({step}: {why})")


def request_tile_permission() -> TilePermission:
    """Ask for the tile state and check that it was granted (every call asks again)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return TilePermission(False, "AMX tile permission: not an x86-64 CPU")
    result = arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    if result < 0:
        return _refusal("ARCH_REQ_XCOMP_PERM", -result)
    mask = ctypes.c_uint64(0)
    result = arch_prctl(ARCH_GET_XCOMP_PERM, ctypes.addressof(mask))
    if result < 0:
        return _refusal("ARCH_GET_XCOMP_PERM", -result)
    if not mask.value >> XFEATURE_XTILEDATA & 1:
        return TilePermission(
            False,
            f"AMX tile permission refused (ARCH_GET_XCOMP_PERM shows 0x{mask.value:x}, "
            f"without XTILEDATA bit {XFEATURE_XTILEDATA})",
        )
    return TilePermission(True, GRANTED)


@cache
def tile_permission() -> TilePermission:
    """The permission, asked for once per process."""
    return request_tile_permission()
