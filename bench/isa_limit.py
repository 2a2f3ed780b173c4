"""Run the baselines (ONNX Runtime, PyTorch, numpy) as they run on a CPU with less vector ISA
than this one, so tvmdeploy's code for that ISA is compared with theirs on the same hardware.

ONNX Runtime's MLAS takes AVX-512 kernels only where CPUID lists AVX-512F *and* XCR0 (read with
`xgetbv`) says the OS saves the opmask and ZMM state; it has no switch, and Linux VMs often cannot
fault CPUID. So a copy of the installed package is made with every `xgetbv` replaced by
`push 7; pop rax` (same 3 bytes): x87, SSE and AVX state only, which is what XCR0 says on an
AVX2-only CPU, and MLAS takes its AVX2/FMA3 kernels. The copy goes first on PYTHONPATH of a child
process; the installed package is untouched. PyTorch, oneDNN, MKL and OpenBLAS have documented
environment variables for the same limit.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

XGETBV = b"\x0f\x01\xd0"
XCR0_AVX_ONLY = b"\x6a\x07\x58"  # push 7; pop rax: XCR0 = x87 | SSE | AVX
LIMITS = {
    "avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OPENBLAS_CORETYPE": "Haswell",
    }
}
MARKER = "TVMDEPLOY_BENCH_BASELINE_ISA"  # set in the child: its baselines are limited


SECTION_ROW = re.compile(
    r"^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\S+\s*\n"
    r"\s*([A-Z, ]+)$",
    re.MULTILINE,
)  # `objdump -h`: index, name, size, address, load address, file offset, alignment; flags
#: Bytes before a candidate where disassembly starts. x86 decoding falls into step with the real
#: instruction boundaries within a few instructions, so a candidate counts only if a decode from
#: each of these starts meets an `xgetbv` exactly there (bytes inside another instruction or in
#: data do not).
WINDOW_STARTS = (40, 72, 104)


def _code_sections(library: Path) -> list[tuple[int, int, int]]:
    """(address, size, file offset) of each section holding code, from `objdump -h`."""
    headers = subprocess.run(
        ["objdump", "-h", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return [
        (int(m[3], 16), int(m[2], 16), int(m[4], 16))
        for m in SECTION_ROW.finditer(headers)
        if "CODE" in m[5]
    ]


def _decodes_as_xgetbv(library: Path, address: int, section_start: int) -> bool:
    """Whether disassembly from each of WINDOW_STARTS bytes earlier meets `xgetbv` at
    `address` (a start before the section is moved to the section's first byte)."""
    for back in WINDOW_STARTS:
        listing = subprocess.run(
            [
                "objdump",
                "-d",
                "--no-show-raw-insn",
                f"--start-address={max(section_start, address - back):#x}",
                f"--stop-address={address + 3:#x}",
                str(library),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if not re.search(rf"^\s*{address:x}:\s+xgetbv\b", listing, re.MULTILINE):
            return False
    return True


def hide_avx512(library: Path) -> int:
    """Rewrite every `xgetbv` instruction in `library`'s code to report XCR0 without AVX-512
    state. Found as bytes, each confirmed by disassembly around it (a whole-library disassembly
    took ~10 s per ONNX Runtime library). Returns how many were rewritten."""
    data = bytearray(library.read_bytes())
    found = 0
    for start, size, file_offset in _code_sections(library):
        end = file_offset + size
        offset = data.find(XGETBV, file_offset, end)
        while offset != -1:
            address = offset - file_offset + start
            if _decodes_as_xgetbv(library, address, start):
                data[offset : offset + 3] = XCR0_AVX_ONLY
                found += 1
            offset = data.find(XGETBV, offset + 1, end)
    library.write_bytes(bytes(data))
    return found


def limited_environment(isa: str, workdir: Path) -> dict[str, str]:
    """Environment variables for a child process whose baselines use at most `isa`: a patched
    onnxruntime copy under `workdir` (first on PYTHONPATH) and the libraries' own limits."""
    if isa not in LIMITS:
        raise ValueError(f"unknown ISA limit {isa!r}; known: {', '.join(LIMITS)}")
    if shutil.which("objdump") is None:
        raise RuntimeError("objdump (binutils) is needed to limit ONNX Runtime's ISA")
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        raise RuntimeError("onnxruntime is not installed")
    package = workdir / "onnxruntime"
    shutil.copytree(Path(spec.origin).parent, package, symlinks=True)
    patched = sum(hide_avx512(lib) for lib in (package / "capi").glob("*.so*"))
    if not patched:
        raise RuntimeError("no xgetbv found in onnxruntime's libraries; cannot limit its ISA")
    path = os.pathsep.join(filter(None, (str(workdir), os.environ.get("PYTHONPATH"))))
    return {**LIMITS[isa], MARKER: isa, "PYTHONPATH": path}


def limited_isa() -> str | None:
    """The ISA this process's baselines are limited to (None: not limited), after checking that
    the onnxruntime imported is the patched copy and not the installed package."""
    isa = os.environ.get(MARKER)
    if not isa:
        return None
    import onnxruntime

    copy = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    if not Path(onnxruntime.__file__).is_relative_to(copy):
        raise RuntimeError(f"onnxruntime at {onnxruntime.__file__} is not the {isa}-limited copy")
    return isa
