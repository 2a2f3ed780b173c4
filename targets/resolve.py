"""Profile names as users write them (`host`, several `-t`) to profiles.

`host` is the most specific CPU profile this machine runs, ranked by the same rule the runtime uses
to choose among a bundle's artifacts (runtime/select.py), so a bundle compiled for `host` holds
the artifact the runtime would pick here.
"""

from __future__ import annotations

from tvmdeploy.runtime.probe import DeviceInfo, missing_requirements, probe, slower_than_fp32
from tvmdeploy.runtime.select import rank_key

from . import Profile, all_profiles, get
from .errors import NoProfileFitsError

HOST = "host"


def host_profile(device: DeviceInfo | None = None, cpu_only: bool = True) -> Profile:
    """The most specific profile this machine can run (CPU profiles unless cpu_only=False)."""
    device = device or probe()
    runnable = [
        p
        for p in all_profiles()
        if not missing_requirements(p.requires, device) and (not cpu_only or not p.is_gpu)
    ]
    if not runnable:
        raise NoProfileFitsError(
            f"no target profile matches this machine ({device.description}); "
            "name one with -t (see `tvmdeploy targets`)"
        )
    return min(runnable, key=lambda p: rank_key(p.is_gpu, p.requires, p.name))


def resolve_profiles(names: list[str], device: DeviceInfo | None = None) -> list[Profile]:
    """Profiles by name; 'host' is the best one for this machine. Duplicates are dropped."""
    resolved: list[Profile] = []
    for name in names:
        profile = host_profile(device) if name == HOST else get(name)
        if profile not in resolved:
            resolved.append(profile)
    return resolved


def resolve_profile(name: str, device: DeviceInfo | None = None) -> Profile:
    """One profile by name ('host' included)."""
    return resolve_profiles([name], device)[0]


def runs_bf16(name: str = HOST, device: DeviceInfo | None = None) -> bool:
    """Whether this machine runs the bf16 artifacts of profile `name` ('host': its own), so the
    demo and the benchmarks build them only where they can be timed."""
    device = device or probe()
    profile = resolve_profile(name, device)
    needs = profile.for_precision("bf16").requires
    return "bf16" in profile.precisions and not missing_requirements(needs, device)


def bf16_pays(name: str = HOST, device: DeviceInfo | None = None) -> bool:
    """Whether profile `name`'s bf16 artifacts run here and beat fp32: not `vdpbf16ps` on Intel
    (the profile's `slower_than_fp32` rule, the one selection applies), so the demo builds only
    what this CPU runs well."""
    device = device or probe()
    if not runs_bf16(name, device):
        return False
    needs = resolve_profile(name, device).for_precision("bf16").requires
    return not slower_than_fp32(needs, device)
