"""CUDA kernels compiled ahead of time, so a device needs only the NVIDIA driver.

What TVM 0.27 does by itself: `target.build.cuda` emits CUDA C++ source and wraps it in a module
of kind "cuda" whose code format (`fmt`) is "cuda". On a build host without a GPU, nothing is
compiled: the compiler library never calls `tvm_callback_cuda_compile`, and `export_library`
serializes the module as it is (`[fmt][function table][code]`) into the library's import blob.
When that library is loaded, libtvm_runtime_cuda sees fmt "cuda" and compiles the source then,
through the Python callback `tvm_callback_cuda_compile` (NVRTC from `cuda-bindings` by default,
nvcc with TVM_CUDA_COMPILE_MODE=nvcc); so every device would need TVM's compiler-side Python and
a CUDA compiler, and would compile on every load. (On a build host whose TVM runtime has CUDA,
the module is compiled at codegen time through the same callback, with NVRTC by default.)

What we do instead: compile the source here with nvcc into a fatbin holding SASS for the
profile's arch and PTX for the same arch (a newer GPU's driver can JIT the PTX), and put it in the
library in place of the source:
* without a GPU here, by rewriting the CUDA module's serialized record from fmt "cuda" to
  "fatbin" while `export_library` packs the imports (its `fpack_imports` hook);
* with a GPU here, by registering our own `tvm_callback_cuda_compile` while `tvm.compile` runs,
  so the codegen-time compile makes the same fatbin with nvcc instead of NVRTC.
The loader then hands the bytes to `cuModuleLoadData`; no CUDA compiler is needed on the device.

nvcc is located, in order: `nvcc` on PATH, `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then
`/usr/local/cuda/bin/nvcc`. Without one, the library keeps the CUDA source (with a warning) and
`code_form` says "cuda-source-in-library".
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import struct
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ..errors import CudaBuildError

FATBIN = "cuda-fatbin"
SOURCE = "cuda-source-in-library"
FATBIN_MAGIC = 0xBA55ED50  # first word of every fatbin (little-endian 50 ed 55 ba)
_CALLBACK = "tvm_callback_cuda_compile"
_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)
_U64 = struct.Struct("<Q")


# -- locating nvcc ----------------------------------------------------------------------------


def find_nvcc() -> Path | None:
    """nvcc from PATH, $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda/bin (first found)."""
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        candidate = Path(root) / "bin" / "nvcc"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@cache
def nvcc_version(nvcc: Path) -> str:
    """'13.0.88' from `nvcc --version` (empty if it cannot be read)."""
    out = subprocess.run(
        [str(nvcc), "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"V(\d+\.\d+\.\d+)", out)
    return found.group(1) if found else ""


@cache
def nvcc_gpu_codes(nvcc: Path) -> frozenset[str]:
    """The real architectures this nvcc can emit SASS for (`nvcc --list-gpu-code`)."""
    out = subprocess.run(
        [str(nvcc), "--list-gpu-code"], capture_output=True, text=True, check=False
    ).stdout
    return frozenset(out.split())


@contextlib.contextmanager
def _nvcc_on_path(nvcc: Path) -> Iterator[None]:
    """TVM's nvcc wrapper runs plain `nvcc`; put the one we found first on PATH meanwhile."""
    if shutil.which("nvcc") == str(nvcc):
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = str(nvcc.parent) + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


# -- compiling --------------------------------------------------------------------------------


def gencode_flags(arch: str, embed_ptx: bool = True) -> list[str]:
    """nvcc -gencode flags: SASS for `arch` (e.g. sm_80) and, for forward compatibility, its PTX.

    Arch-specific targets such as sm_90a get no PTX: theirs cannot run on any other GPU.
    """
    match = re.fullmatch(r"sm_(\d+)([a-z]?)", arch)
    if not match:
        raise CudaBuildError(f"CUDA arch {arch!r} is not of the form sm_XY; fix the target profile")
    number = match.group(1) + match.group(2)
    flags = ["-gencode", f"arch=compute_{number},code=sm_{number}"]
    if embed_ptx and not match.group(2):
        flags += ["-gencode", f"arch=compute_{number},code=compute_{number}"]
    return flags


def compile_fatbin(source: str, arch: str, nvcc: Path) -> bytes:
    """TVM's CUDA source to a fatbin for `arch`, with the flags TVM itself gives nvcc."""
    import tvm
    from tvm.support import nvcc as tvm_nvcc

    if arch not in nvcc_gpu_codes(nvcc):
        raise CudaBuildError(
            f"{nvcc} (CUDA {nvcc_version(nvcc) or '?'}) cannot compile for {arch}; it supports "
            f"{', '.join(sorted(nvcc_gpu_codes(nvcc))) or 'nothing it would list'}. Use a CUDA "
            "toolkit that supports this GPU, or drop the profile from --target"
        )
    try:
        with _nvcc_on_path(nvcc), tvm.target.Target({"kind": "cuda", "arch": arch}):
            binary = tvm_nvcc.compile_cuda(
                source, target_format="fatbin", arch=gencode_flags(arch), compiler="nvcc"
            )
    except RuntimeError as err:  # TVM puts the whole source first, nvcc's log after it
        log = str(err).rpartition("Compilation error:")[2].strip()
        raise CudaBuildError(
            f"nvcc {nvcc_version(nvcc)} ({nvcc}) failed to compile TVM's kernels for {arch}:\n"
            f"{log[-3000:]}\nSet TVM_KERNEL_DUMP=<dir> to keep the source for a bug report."
        ) from None
    binary = bytes(binary)
    if binary[:4] != _MAGIC_BYTES:
        raise CudaBuildError(f"nvcc did not produce a fatbin for {arch} (got {len(binary)} bytes)")
    return binary


@contextlib.contextmanager
def codegen_compiles_with_nvcc(arch: str, nvcc: Path | None) -> Iterator[None]:
    """While `tvm.compile` runs, make TVM's codegen-time CUDA compile (GPU build hosts) use nvcc.

    Without this, a GPU build host compiles with NVRTC, which needs `cuda-bindings` and makes a
    cubin without PTX; with it, the kernels come out as the same fatbin as on a host without a GPU.
    """
    import tvm_ffi

    if nvcc is None:
        yield
        return
    original = tvm_ffi.get_global_func(_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(
        _CALLBACK, lambda code: compile_fatbin(code, arch, nvcc), override=True
    )
    try:
        yield
    finally:
        if original is not None:
            tvm_ffi.register_global_func(_CALLBACK, original, override=True)
        else:
            tvm_ffi.remove_global_func(_CALLBACK)


# -- the library's import blob ----------------------------------------------------------------
# PackImportsToBytes (TVM src/target/codegen.cc): u64 total size, u64-counted vectors row_ptr and
# child_indices, then per module a u64-prefixed kind and, unless the kind is "_lib" (the host
# DSO), u64-prefixed bytes from its SaveToBytes. A CUDA module saves [fmt][fmap][code], each
# u64-prefixed where a string; `code` is always the last field.


@dataclass
class ImportRecord:
    kind: str
    payload: bytes | None  # None for the "_lib" placeholder


def _read_bytes(data: bytes, offset: int) -> tuple[bytes, int]:
    (size,) = _U64.unpack_from(data, offset)
    start = offset + 8
    if start + size > len(data):
        raise CudaBuildError("truncated TVM import blob")
    return data[start : start + size], start + size


def parse_imports(blob: bytes) -> tuple[bytes, list[ImportRecord]]:
    """Split a packed import blob (with its u64 size header) into the tree and its records."""
    (size,) = _U64.unpack_from(blob)
    if size != len(blob) - 8:
        raise CudaBuildError("TVM import blob has an unexpected size header")
    offset = 8
    for _ in range(2):  # import_tree_row_ptr, import_tree_child_indices
        (count,) = _U64.unpack_from(blob, offset)
        offset += 8 + 8 * count
    tree = blob[8:offset]
    records = []
    while offset < len(blob):
        kind, offset = _read_bytes(blob, offset)
        payload = None
        if kind != b"_lib":
            payload, offset = _read_bytes(blob, offset)
        records.append(ImportRecord(kind.decode(), payload))
    return tree, records


def pack_imports(tree: bytes, records: list[ImportRecord]) -> bytes:
    """The inverse of parse_imports."""
    body = bytearray(tree)
    for record in records:
        body += _U64.pack(len(record.kind)) + record.kind.encode()
        if record.payload is not None:
            body += _U64.pack(len(record.payload)) + record.payload
    return _U64.pack(len(body)) + bytes(body)


def cuda_record_code(payload: bytes) -> tuple[str, bytes]:
    """(fmt, code) of a serialized CUDA module: a fatbin, cubin, PTX or CUDA source."""
    fmt, offset = _read_bytes(payload, 0)
    # The function table sits between fmt and code; find code by its u64 length matching the tail.
    for start in range(offset + 8, len(payload) - 3):
        fits = _U64.unpack_from(payload, start - 8)[0] == len(payload) - start
        if fits and (fmt != b"fatbin" or payload[start : start + 4] == _MAGIC_BYTES):
            return fmt.decode(), payload[start:]
    raise CudaBuildError("cannot find the code in TVM's serialized CUDA module")


def _with_fatbin(
    payload: bytes, sources: list[str], compile_source: Callable[[str], bytes]
) -> bytes:
    """A CUDA module record with its source (fmt "cuda") replaced by the compiled fatbin."""
    fmt, offset = _read_bytes(payload, 0)
    if fmt != b"cuda":
        return payload  # compiled already (at codegen time, on a GPU build host)
    for source in sources:
        code = source.encode()
        tail = _U64.pack(len(code)) + code
        if payload.endswith(tail):
            fmap = payload[offset : len(payload) - len(tail)]
            fatbin = compile_source(source)
            return _U64.pack(6) + b"fatbin" + fmap + _U64.pack(len(fatbin)) + fatbin
    raise CudaBuildError(
        "TVM's serialized CUDA module does not have the [fmt][functions][source] layout tvmdeploy "
        "knows; this TVM version is not supported for ahead-of-time CUDA kernels"
    )


def _cuda_sources(mod: Any) -> list[str]:
    """CUDA source of every source-form CUDA module in `mod`'s import tree."""
    sources, stack, seen = [], [mod], set()
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        if module.kind == "cuda":
            source = module.inspect_source("cuda")
            if source:
                sources.append(source)
        stack.extend(module.imports)
    return sources


def _llvm_target_string(mod: Any) -> str:
    for module in mod._collect_dso_modules():
        if module.kind == "llvm":
            return module.get_function("_get_target_string")()
    raise CudaBuildError("the CUDA executable has no LLVM host module to carry the kernels")


def _fatbin_packer(arch: str, nvcc: Path) -> Callable[..., str]:
    """An `fpack_imports` for export_library that embeds fatbins instead of CUDA source."""

    def pack(mod: Any, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        import tvm_ffi
        from tvm.runtime import _ffi_api

        tree, records = parse_imports(_ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes())
        sources = _cuda_sources(mod)
        for record in records:
            if record.kind == "cuda" and record.payload is not None:
                record.payload = _with_fatbin(
                    record.payload, sources, lambda source: compile_fatbin(source, arch, nvcc)
                )
        codegen_blob = tvm_ffi.get_global_func("codegen.codegen_blob", allow_missing=True)
        if codegen_blob is None:
            raise CudaBuildError(
                "this TVM has no LLVM backend (codegen.codegen_blob) to embed the kernels"
            )
        blob_module = codegen_blob(
            pack_imports(tree, records), is_system_lib, _llvm_target_string(mod), symbol_prefix
        )
        path = os.path.join(workspace_dir, f"{symbol_prefix}devc.o")
        blob_module.write_to_file(path)
        return path

    return pack


# -- reading a built library back ---------------------------------------------------------------


def library_blob(lib_path: str | Path, symbol: str = "__tvm_ffi__library_bin") -> bytes:
    """The packed import blob of an exported TVM library, read from its ELF symbol table.

    Reads the file only (no dlopen), so it works for libraries this host could not load.
    """
    data = Path(lib_path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise CudaBuildError(f"{lib_path}: not a 64-bit little-endian ELF library")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    wanted = symbol.encode()
    for sh in sections:
        if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        for k in range(sh[5] // 24):
            name, _, _, shndx, value, _ = struct.unpack_from("<IBBHQQ", data, sh[4] + k * 24)
            start = strtab[4] + name
            if data[start : data.index(b"\0", start)] == wanted and 0 < shndx < len(sections):
                home = sections[shndx]
                offset = home[4] + value - home[3]
                (size,) = _U64.unpack_from(data, offset)
                return data[offset : offset + 8 + size]
    raise CudaBuildError(f"{lib_path}: no {symbol} (a library without device code?)")


@dataclass
class FatbinEntry:
    kind: str  # "sass" (an ELF cubin) or "ptx"
    arch: str  # "sm_80" for SASS, "compute_80" for PTX


def fatbin_entries(fatbin: bytes) -> list[FatbinEntry]:
    """What a fatbin holds, from its entry headers (kind 1 = PTX, 2 = ELF; arch at +0x1c)."""
    magic, _, header_size, body_size = struct.unpack_from("<IHHQ", fatbin)
    if magic != FATBIN_MAGIC:
        raise CudaBuildError("not a fatbin")
    entries, offset, end = [], header_size, header_size + body_size
    while offset < end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", fatbin, offset)
        (arch,) = struct.unpack_from("<I", fatbin, offset + 0x1C)
        ptx = kind == 1
        entries.append(
            FatbinEntry("ptx" if ptx else "sass", f"{'compute' if ptx else 'sm'}_{arch}")
        )
        offset += entry_header + payload
    return entries


@dataclass
class DeviceCode:
    """The CUDA code carried by a library: its format and, for fatbins, what they hold."""

    fmt: str  # "fatbin", "cubin", "ptx" or "cuda" (source)
    code: bytes

    @property
    def code_form(self) -> str:
        return (
            FATBIN
            if self.code[:4] == _MAGIC_BYTES
            else (SOURCE if self.fmt == "cuda" else f"cuda-{self.fmt}")
        )

    @property
    def entries(self) -> list[FatbinEntry]:
        return fatbin_entries(self.code) if self.code_form == FATBIN else []


def device_code(lib_path: str | Path) -> list[DeviceCode]:
    """Every CUDA module embedded in an exported library."""
    _, records = parse_imports(library_blob(lib_path))
    found = []
    for record in records:
        if record.kind == "cuda" and record.payload is not None:
            found.append(DeviceCode(*cuda_record_code(record.payload)))
    return found


# -- the build hook -----------------------------------------------------------------------------


def code_form_of(lib_path: str | Path) -> str:
    """The manifest's `code_form` for a CUDA library, read from what it really embeds."""
    forms = {code.code_form for code in device_code(lib_path)}
    if len(forms) != 1:
        return SOURCE if SOURCE in forms else "+".join(sorted(forms)) or "cuda-no-kernels"
    return forms.pop()


def compile_and_export(mod: Any, target: Any, pipeline: Any, arch: str, lib_path: Path) -> str:
    """tvm.compile + export_library for a CUDA profile, kernels ahead of time; returns code_form."""
    import tvm

    nvcc = find_nvcc()
    with codegen_compiles_with_nvcc(arch, nvcc):
        executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    if nvcc is None:
        warnings.warn(
            f"nvcc not found (PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin): the "
            f"{arch} "
            "artifact carries CUDA source, which TVM compiles when it is loaded, so the device "
            "needs "
            "NVRTC (pip install cuda-bindings) and TVM's compiler package. Install the CUDA "
            "toolkit "
            "and rebuild to embed a fatbin.",
            stacklevel=2,
        )
        executable.export_library(str(lib_path))
        return SOURCE
    executable.export_library(str(lib_path), fpack_imports=_fatbin_packer(arch, nvcc))
    return code_form_of(lib_path)
