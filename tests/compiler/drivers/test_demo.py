"""The demo builds what this CPU runs well: its own profile, bf16 only where it beats fp32."""

import pytest
from tvmdeploy.compiler.drivers.demo import demo_precisions
from tvmdeploy.runtime.probe import DeviceInfo

AVX2 = ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "lzcnt", "popcnt"]
AVX512_BF16 = AVX2 + [
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"
]  # fmt: skip


AMX = AVX512_BF16 + [
    "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
]  # fmt: skip


def device(model, arch, features):
    vendor = "" if arch != "x86_64" else "GenuineIntel" if "Intel" in model else "AuthenticAMD"
    return DeviceInfo(
        arch=arch,
        cpu_model=model,
        cpu_features=frozenset(features),
        cores=2,
        tile_permission="granted" if "amx_tile" in features else "",
        vendor=vendor,
    )


@pytest.mark.parametrize(
    ("model", "arch", "features", "expected"),
    [
        # Zen 4/5: vdpbf16ps at about half of ONNX Runtime fp32's time (docs/benchmarks.md).
        ("AMD EPYC 9R45", "x86_64", AVX512_BF16, ["fp32", "int8", "bf16"]),
        # Cooper Lake (the profile's rule): vdpbf16ps is slower than the fp32 FMA: no bf16.
        ("Intel(R) Xeon(R) Platinum 8380HL", "x86_64", AVX512_BF16, ["fp32", "int8"]),
        # Sapphire Rapids: x86-amx, whose bf16 is on tiles (tdpbf16ps).
        ("Intel(R) Xeon(R) Platinum 8488C", "x86_64", AMX, ["fp32", "int8", "bf16"]),
        ("AMD EPYC 7R13", "x86_64", AVX2, ["fp32", "int8"]),
        ("Cortex-A72", "aarch64", ["asimd"], ["fp32", "int8"]),
    ],
)
def test_demo_precisions_follow_what_the_cpu_runs_well(model, arch, features, expected):
    assert demo_precisions("host", device(model, arch, features)) == expected
