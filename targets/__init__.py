"""Target profiles: one TOML file per device class, loaded as data.

A profile says how to compile (the TVM target dict, a host target for GPUs, a cross compiler) and
what a device must have to run the result (`requires`). Adding a device is adding a file here.
Names (docs/design.md): a *profile* is one of these files; its *target* is the TVM target dict it
holds; an *artifact* is the code compiled for one profile and precision.

This module is stdlib-only; `resolve` (which profile is `host`) reads the device probe, so the
layering is runtime → targets → compiler, never the other way.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ProfileError, UnknownTargetError

PROFILE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Profile:
    """One target profile, as read from `targets/<name>.toml`."""

    name: str
    description: str
    family: str  # "x86", "arm" or "cuda"
    target: dict[str, Any]
    requires: dict[str, Any]
    host: dict[str, Any] | None = None
    cross_cc: str | None = None
    qemu_cpu: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict)
    #: What a reduced precision adds to the profile, by short name: `mattr` for the target,
    #: `cpu_features` a device must have too (bf16 needs AVX512-BF16 on top of AVX-512), and
    #: `slower_than_fp32` (`vendors`, `why`): CPUs that run its kernels but slower than fp32.
    precisions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_precision(self, short_name: str) -> Profile:
        """The profile an artifact of that precision is built for: this one, plus the target
        features and device requirements its kernels add (none for most precisions)."""
        extra = self.precisions.get(short_name)
        if not extra:
            return self
        target = dict(self.target)
        target["mattr"] = [*target.get("mattr", []), *extra.get("mattr", [])]
        requires = dict(self.requires)
        requires["cpu_features"] = [
            *requires.get("cpu_features", []),
            *extra.get("cpu_features", []),
        ]
        if "slower_than_fp32" in extra:  # where it runs but loses (runtime/probe.py)
            requires["slower_than_fp32"] = dict(extra["slower_than_fp32"])
        return replace(self, target=target, requires=requires)

    @property
    def is_gpu(self) -> bool:
        return self.family == "cuda"

    @property
    def arch(self) -> str:
        """The CPU architecture a device needs (`x86_64` or `aarch64`)."""
        return self.requires["arch"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "family": self.family,
            "target": self.target,
            "host": self.host,
            "cross_cc": self.cross_cc,
            "qemu_cpu": self.qemu_cpu,
            "requires": self.requires,
            "tuning": self.tuning,
            "precisions": self.precisions,
        }


def _load(path: Path) -> Profile:
    with path.open("rb") as f:
        data = tomllib.load(f)
    if data.get("name") != path.stem:
        raise ProfileError(
            f"{path}: 'name' must be {path.stem!r}, found {data.get('name')!r}; rename the file or "
            f"fix the name"
        )
    return Profile(
        name=data["name"],
        description=data["description"],
        family=data["family"],
        target=dict(data["target"]),
        requires=dict(data["requires"]),
        host=dict(data["host"]) if "host" in data else None,
        cross_cc=data.get("cross_cc"),
        qemu_cpu=data.get("qemu_cpu"),
        tuning=dict(data.get("tuning", {})),
        precisions={k: dict(v) for k, v in data.get("precisions", {}).items()},
    )


@cache
def _profiles() -> dict[str, Profile]:
    return {p.stem: _load(p) for p in sorted(PROFILE_DIR.glob("*.toml"))}


def all_profiles() -> list[Profile]:
    """Every profile, sorted by name."""
    return list(_profiles().values())


def names() -> list[str]:
    return list(_profiles())


def get(name: str) -> Profile:
    """The profile called `name`; the error lists the known names."""
    try:
        return _profiles()[name]
    except KeyError:
        raise UnknownTargetError(
            f"unknown target profile {name!r}; known profiles: {', '.join(names())} "
            "(or 'host' for the best profile for this machine)"
        ) from None


__all__ = [
    "Profile",
    "ProfileError",
    "UnknownTargetError",
    "all_profiles",
    "get",
    "names",
]
