"""Profile names as users write them: `host` follows the device, several `-t` keep their order."""

import pytest
from tvmdeploy import targets
from tvmdeploy.runtime.errors import TvmdeployError
from tvmdeploy.runtime.probe import DeviceInfo, probe
from tvmdeploy.targets.resolve import host_profile, resolve_profile, resolve_profiles, runs_bf16

AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "lzcnt", "popcnt"]
AVX512 = AVX2 + ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]


def device(arch, features):
    return DeviceInfo(
        arch=arch, cpu_model="simulated", cpu_features=frozenset(features), cores=2, cuda=()
    )


@pytest.mark.parametrize(
    ("arch", "features", "expected"),
    [
        ("x86_64", AVX2, "x86-64-v3"),
        ("x86_64", AVX2 + ["avx_vnni"], "x86-64-v3-vnni"),
        ("x86_64", AVX512, "x86-64-v4"),
        ("x86_64", AVX512 + ["avx512_vnni"], "x86-avx512-vnni"),
        ("x86_64", AVX512 + ["avx512_vnni", "avx512_bf16"], "x86-avx512-vnni"),  # Cooper Lake
        ("aarch64", ["asimd"], "arm64-neon"),
        ("aarch64", ["asimd", "asimddp"], "arm64-dotprod"),
    ],
)
def test_host_is_the_most_specific_profile_the_device_runs(arch, features, expected):
    assert host_profile(device(arch, features)).name == expected


def test_host_on_this_machine_is_runnable_here():
    from tvmdeploy.runtime.probe import missing_requirements

    assert missing_requirements(resolve_profile("host").requires, probe()) == []


def test_no_profile_fits_is_a_tvmdeploy_error():
    with pytest.raises(targets.errors.NoProfileFitsError, match="name one with -t") as caught:
        host_profile(device("riscv64", []))
    assert isinstance(caught.value, TvmdeployError)


def test_several_names_keep_order_and_drop_duplicates():
    simulated = device("x86_64", AVX2)
    names = [p.name for p in resolve_profiles(["arm64-neon", "host", "x86-64-v3"], simulated)]
    assert names == ["arm64-neon", "x86-64-v3"]


def test_unknown_name_is_a_tvmdeploy_error_listing_the_known_ones():
    with pytest.raises(targets.UnknownTargetError, match="known profiles: .*x86-64-v4") as caught:
        resolve_profiles(["x86-64-v9"])
    assert isinstance(caught.value, TvmdeployError) and not isinstance(caught.value, KeyError)


@pytest.mark.parametrize(
    ("features", "runs"),
    [
        (AVX2, False),  # x86-64-v3 has no bf16 kernels
        (AVX2 + ["avx512_bf16"], False),  # (no such CPU; still no AVX-512 profile)
        (AVX512, False),  # AVX-512 without BF16: Skylake-SP, Ice Lake
        (AVX512 + ["avx512_vnni", "avx512_bf16"], True),  # Cooper Lake, Zen 4
        (AVX512 + ["avx512_bf16"], True),
    ],
)
def test_bf16_runs_only_on_avx512_cpus_with_bf16(features, runs):
    assert runs_bf16("host", device("x86_64", features)) is runs


SAPPHIRE_RAPIDS = targets.get("x86-amx").requires["cpu_features"]


def test_host_is_amx_on_a_sapphire_rapids_with_the_tile_permission():
    spr = DeviceInfo("x86_64", "Intel Xeon", frozenset(SAPPHIRE_RAPIDS), 2, (), "granted")
    assert host_profile(spr).name == "x86-amx"
    # The kernel refused the tiles: the best profile without them.
    refused = DeviceInfo("x86_64", "Intel Xeon", frozenset(SAPPHIRE_RAPIDS), 2, (), "EPERM")
    assert host_profile(refused).name == "x86-avx512-vnni"


@pytest.mark.parametrize(
    "features",
    [
        AVX2,
        AVX512 + ["avx512_vnni", "avx512_bf16"],
        [f for f in SAPPHIRE_RAPIDS if f != "amx_int8"],
    ],
)
def test_the_amx_profile_is_refused_without_amx_naming_what_is_missing(features):
    from tvmdeploy.runtime.probe import missing_requirements

    missing = missing_requirements(targets.get("x86-amx").requires, device("x86_64", features))
    assert missing and "amx_int8" in missing[0]
