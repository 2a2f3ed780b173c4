"""The compile driver for causal LMs: source → config → build per profile → gate → package.

`compile_model` hands over here when the model is a decoder (an HF causal-LM folder, a LoRA
adapter folder, a GGUF file: decoder/sources.py). The steps, in order:
1. the source made into one HF folder (adapter merged, GGUF converted), its config read and
   checked (an unsupported architecture or config feature is refused before any build);
2. the folder exported to ONNX by optimum (decoder/onnx_export.py; `--no-onnx` skips it): the
   bundle's ONNX Runtime engine and second reference;
3. per profile: the decoder definition exported to Relax and built (decoder/lower.py);
4. the references, once per prompt: transformers' and ONNX Runtime's (on the export) prefill
   logits and greedy tokens on fixed prompts; the export compared with transformers (an export
   that disagrees is left out of the bundle, the manifest says why);
5. the bundle staged, each artifact this machine runs gated through the runtime's `Generator`
   against both references (decoder/parity.py), then moved in place; a failed gate leaves
   nothing written.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvmdeploy.runtime.generate import PAGE_SIZE
from tvmdeploy.runtime.precision import artifact_name, canonical, short
from tvmdeploy.targets import Profile
from tvmdeploy.targets.resolve import resolve_profiles

from .. import build, package
from ..decoder import gguf_int4, lower, onnx_export, parity, quality, quantized, sources, weights
from ..decoder.config import DecoderConfig, read_decoder_config
from ..errors import OptionError, ParityError, QemuUnavailable
from ..kernels.cpu_int8 import kernel_for
from .stages import Stages

logger = logging.getLogger(__name__)

#: The context a bundle is compiled for when --context is not given (a model's own limit may be
#: far larger; the runtime's KV cache is sized by it).
DEFAULT_CONTEXT = 4096
#: Prompt tokens per prefill call; longer prompts are prefilled in chunks of this size, a chunk
#: after the first attending to the earlier keys in the cache's pages (on a CPU through
#: kernels/cpu_prefill_attention.paged_prefill). Measured on SmolLM2 int8 (docs/benchmarks.md), a
#: 4000-token prompt in chunks of 512 took 8.9 s and peaked at 448 MB, in one chunk of 4096 9.4 s
#: and 602 MB (the transient activations grow with the chunk); 1000 tokens took as long in 1, 2,
#: 4 or 8 chunks. It was 4096 while TVM's scalar paged kernel ran the later chunks.
PREFILL_CHUNK = 512
#: The emulated gate's limit: the tiny test models take ~1 min under qemu-user; a real model's
#: arm64 artifact may take far longer (then the gate fails with the timeout, saying so).
EMULATION_TIMEOUT_S = 1800
#: Weights above this are not run under QEMU (`not-run`, with the reason): emulation decodes a
#: tiny model in seconds, a 135M one at a fraction of a token per second. Verify such arm64
#: artifacts on a device (`--rpc`), or a tiny model of the same family under QEMU.
EMULATION_MAX_WEIGHT_BYTES = 64 << 20


#: The precisions a generation bundle can hold (weight-only int8 and int4: decoder/quantized.py,
#: decoder/quantized_int4.py).
DECODER_PRECISIONS = ("float32", "int8", "int4")


def plan_profiles(options) -> list[Profile]:
    """The profiles to build, refusing what the decoder path does not build yet."""
    profiles = resolve_profiles(options.profiles)
    dtypes = {canonical(p) for p in options.precisions}
    unknown = sorted(dtypes - set(DECODER_PRECISIONS))
    if unknown:
        raise OptionError(
            f"--precision {','.join(options.precisions)}: generation bundles are built in "
            f"{', '.join(map(short, DECODER_PRECISIONS))} (not {', '.join(map(short, unknown))})"
        )
    if options.tune_trials:
        raise OptionError("--tune does not apply to generation bundles yet; leave it out")
    if options.rpc:
        raise OptionError("--rpc does not apply to generation bundles yet; leave it out")
    return profiles


def precisions_of(options) -> list[str]:
    """The asked precisions as dtypes, fp32 first, each once."""
    dtypes = {canonical(p) for p in options.precisions}
    return [p for p in DECODER_PRECISIONS if p in dtypes]


def context_length(config: DecoderConfig, asked: int | None) -> int:
    """The context the bundle serves: --context, at most the model's own limit."""
    if asked is not None:
        if asked < 2:
            raise OptionError(f"--context must be at least 2 tokens, not {asked}")
        if asked > config.context_length:
            raise OptionError(
                f"--context {asked} exceeds the model's own limit of {config.context_length}"
            )
        return asked
    return min(config.context_length, DEFAULT_CONTEXT)


def build_profile(
    config: DecoderConfig, profile: Profile, out_dir: Path, stages: Stages, precision: str
):
    """Stage 2 for one profile and precision: (BuildResult, [(parameter name, nn.Parameter)])."""
    name = artifact_name(profile.name, precision)
    with stages(f"build {name}"):
        target = build.tvm_target(profile)
        kernel = kernel_for(profile) if precision in ("int8", "int4") else None
        mod, named = lower.export(config, target, precision, kernel)
        built = build.build_artifact(
            mod, profile, out_dir / name, pipeline=lower.pipeline_for(profile, target, precision)
        )
    logger.info("  %s: built in %.1f s", name, built.seconds)
    return built, named


@dataclass
class References:
    """What the gate compares each artifact with, computed once per prompt (not per artifact)."""

    prompts: list[list[int]]
    transformers: list[parity.ReferenceCase]
    onnxruntime: list[parity.ReferenceCase] | None  # None: no export in the bundle
    no_onnx_why: str = ""


def gate(references: References | None, strict: bool, stages: Stages, heldout=None):
    """The staged bundle's check: each artifact this device runs against both references; an
    aarch64 artifact whose profile names a `qemu_cpu`, on an x86 machine, under qemu-user.
    A quantized artifact passes the quantized gate instead (decoder/quality.py), on `heldout`:
    (held-out token ids, transformers fp32's perplexity on them, where the text came from)."""
    texts, fp32_perplexity, text_source = heldout or ([], None, "")

    def run(staging: Path) -> dict[str, dict[str, Any]]:
        from tvmdeploy.runtime import Bundle, probe
        from tvmdeploy.runtime.generate import Generator
        from tvmdeploy.runtime.probe import missing_requirements
        from tvmdeploy.runtime.select import Choice

        bundle, device = Bundle(staging), probe()
        fields: dict[str, dict[str, Any]] = {}
        for artifact in bundle.artifacts:
            lacking = missing_requirements(artifact.requires, device)
            cpu = _emulated_cpu(artifact, device) if lacking else None
            if not references or (lacking and not cpu):
                why = "verification disabled" if not references else f"this machine lacks {lacking}"
                fields[artifact.name] = {"parity": {"where": "not-run", "detail": why}}
                logger.info("  parity %s: not run (%s)", artifact.name, why)
                continue
            if artifact.precision != "float32":
                if cpu:
                    why = "the quantized gate runs natively only (not under QEMU)"
                    fields[artifact.name] = {"parity": {"where": "not-run", "detail": why}}
                    logger.info("  parity %s: not run (%s)", artifact.name, why)
                    continue
                with stages(f"verify {artifact.name} against transformers fp32 (quantized gate)"):
                    generator = Generator(bundle, Choice(artifact.name, "verifying"), device, 1)
                    record, accuracy = quality.check(
                        generator, references.transformers, texts, fp32_perplexity, text_source
                    )
                logger.info("  gate %s: %s", artifact.name, quality.summary(accuracy))
                if not accuracy["ok"] and strict:
                    raise ParityError(
                        f"{artifact.name}: the quantized gate against transformers fp32 failed: "
                        f"{quality.summary(accuracy)}; no bundle written (build --precision fp32, "
                        "or pass --no-strict-parity to keep it as an artifact `auto` never takes)"
                    )
                fields[artifact.name] = {"parity": record, "accuracy": accuracy}
                continue
            against = "transformers" + (" and ONNX Runtime" if references.onnxruntime else "")
            where = f"qemu:{cpu}" if cpu else "native"
            title = f"verify {artifact.name} against {against}"
            with stages(title + (f" under qemu -cpu {cpu}" if cpu else "")):
                if cpu:
                    observed, extra = run_emulated(bundle, artifact, references.prompts, cpu)
                else:
                    observed, extra = run_native(bundle, artifact, references.prompts, device)
            if isinstance(observed, str) and not extra.get("failed"):  # qemu missing, ...
                logger.info("  parity %s: not run (%s)", artifact.name, observed)
                record = {"where": "not-run", "ok": None, "detail": observed}
                fields[artifact.name] = {"parity": record}
                continue
            records = compare_both(references, observed, where, extra)
            for key, record in records.items():
                if "max_abs_diff" not in record:
                    continue
                name = "ONNX Runtime" if key == "parity_onnxruntime" else "transformers"
                logger.info("  parity %s vs %s: %s", artifact.name, name, parity.summary(record))
                if not record["ok"] and strict:
                    raise ParityError(
                        f"{artifact.name}: generation parity against {name} failed "
                        f"({record['where']}): {parity.summary(record)}; no bundle written"
                    )
            fields[artifact.name] = records
        return fields

    return run


def compare_both(references: References, observed, where: str, extra: dict) -> dict[str, Any]:
    """The manifest fields of one artifact's run: `parity` (against transformers) and
    `parity_onnxruntime` (against the export); `observed` a string where the run failed."""
    if isinstance(observed, str):
        return {"parity": parity.not_compared(where, observed)}
    records = {"parity": parity.compare(references.transformers, observed, where)}
    if references.onnxruntime:
        records["parity_onnxruntime"] = parity.compare(
            references.onnxruntime, observed, where, parity.ONNXRUNTIME
        )
    for record in records.values():
        record.update(extra)
    if not references.onnxruntime:
        detail = f"no ONNX export in the bundle ({references.no_onnx_why})"
        records["parity_onnxruntime"] = {"where": "not-run", "ok": None, "detail": detail}
    return records


def run_native(bundle, artifact, prompts, device):
    """The artifact on this machine, through the runtime's `Generator`: (observed, extra)."""
    from tvmdeploy.runtime.generate import Generator
    from tvmdeploy.runtime.select import Choice

    generator = Generator(bundle, Choice(artifact.name, "verifying"), device, 1)
    observed, rate = parity.observe(generator, prompts)
    return observed, {"decode_tokens_per_s": rate}


def _emulated_cpu(artifact, device) -> str | None:
    """The qemu CPU model to verify an artifact on that this x86 machine cannot run: its
    profile's `qemu_cpu`, for an aarch64 profile; None where emulation does not apply."""
    from tvmdeploy import targets
    from tvmdeploy.targets.errors import UnknownTargetError

    try:
        profile = targets.get(artifact.profile)
    except UnknownTargetError:  # a profile this version does not know: not emulated
        return None
    if profile.qemu_cpu and profile.arch == "aarch64" and device.arch == "x86_64":
        return profile.qemu_cpu
    return None


def run_emulated(bundle, artifact, prompts, cpu: str):
    """An aarch64 artifact of the staged bundle run under qemu-user on `cpu`: (observed, extra),
    compared by the same rules as natively; or (why, extra) where it did not run (qemu or the
    arm64 Python sysroot missing, weights too large) or ran without a result (a crash or a
    timeout: `extra["failed"]`, a failed gate)."""
    from ..emulation import qemu, qemu_decoder

    try:
        arm = qemu.find_arm64_python()
    except QemuUnavailable as e:
        return f"cannot verify under QEMU: {e}", {}
    generation = bundle.model.get("generation") or {}
    context = int(generation["context_length"])
    entry = bundle.weights_entry(artifact.weights)
    size = (bundle.path / entry["file"]).stat().st_size
    if size > EMULATION_MAX_WEIGHT_BYTES:
        return (
            f"{size >> 20} MiB of weights is too large to decode under QEMU (limit "
            f"{EMULATION_MAX_WEIGHT_BYTES >> 20} MiB); verify on an arm64 device"
        ), {}
    run = qemu_decoder.run_decoder(
        bundle.file(artifact.file),
        bundle.file(entry["file"]),
        entry["names"],
        prompts,
        parity.GREEDY_TOKENS,
        cpu,
        context_length=context,
        prefill_chunk=int(generation.get("prefill_chunk") or context),
        page_size=int(generation.get("page_size") or PAGE_SIZE),
        arm=arm,
        timeout=EMULATION_TIMEOUT_S,
    )
    if not run.ok:
        return run.detail, {"failed": True}
    observed = [parity.Observed(p.prefill_logits, p.tokens) for p in run.prompts]
    return observed, {"emulated_seconds": round(run.seconds, 1)}


def eos_token_ids(config: DecoderConfig, model_dir: Path) -> list[int]:
    """The ids generation stops at: the config's, plus `generation_config.json`'s (chat models
    often end turns with a token the config does not name)."""
    import json

    ids = list(config.eos_token_ids)
    try:
        found = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        found = None
    for value in found if isinstance(found, list) else [found]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def model_info(config: DecoderConfig, source, name: str, context: int) -> dict[str, Any]:
    """The manifest's `model` section for a generation bundle."""
    return {
        "name": name,
        "source": source.origin,
        "source_kind": source.kind,
        "task": "text-generation",
        "architecture": config.architecture,
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": eos_token_ids(config, source.model_dir),
        "decoder": config.to_dict(),
        "generation": {
            "context_length": context,
            "prefill_chunk": min(PREFILL_CHUNK, context),
            "page_size": PAGE_SIZE,
            "functions": list(lower.ENTRY_FUNCTIONS),
        },
        "inputs": [{"name": "input_ids", "axes": ["batch", "seq"]}],
        "outputs": [{"name": "logits", "axes": ["batch", "vocab"]}],
    }


def compile_decoder(options) -> Path:
    """Compile a causal LM into a generation bundle; returns its path."""
    profiles = plan_profiles(options)
    stages = Stages(
        3
        + bool(options.onnx)
        + len(profiles) * len(precisions_of(options)) * (1 + bool(options.verify))
    )
    with tempfile.TemporaryDirectory(prefix="tvmdeploy-") as work:
        work_dir = Path(work)
        with stages("read the model (merge an adapter, convert GGUF)"):
            source = sources.resolve_source(options.model, options.base, work_dir)
            config = read_decoder_config(source.model_dir)
            context = context_length(config, options.context)
        logger.info(
            "  %s: %d layers, hidden %d, %d/%d heads, vocabulary %d; context %d",
            config.architecture,
            config.num_layers,
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.vocab_size,
            context,
        )
        exported = onnx_export.skipped("compiled with --no-onnx")
        if options.onnx:
            with stages(f"export to ONNX (optimum, {onnx_export.TASK})"):
                exported = onnx_export.export_decoder(source.model_dir, work_dir / "onnx")
        dtypes = precisions_of(options)
        entries, named = [], {}
        for profile in profiles:
            for precision in dtypes:
                built, named[precision] = build_profile(
                    config, profile, work_dir / "artifacts", stages, precision
                )
                entries.append(
                    package.ArtifactEntry(
                        profile=profile.name,
                        family=profile.family,
                        target=built.target,
                        requires=profile.for_precision(short("float32")).requires,
                        lib_path=built.lib_path,
                        code_form=built.code_form,
                        precision=precision,
                        weights=precision,
                    )
                )
        references, export_parity, heldout = None, None, None
        title = "transformers'" + (" and ONNX Runtime's" if exported.onnx_path else "")
        with stages(f"reference: {title} logits and greedy tokens"):
            if options.verify:
                found = reference_runs(source.model_dir, config, exported, context)
                references, export_parity = found
                if set(dtypes) & set(lower.QUANTIZED):
                    heldout = reference_heldout(source.model_dir)
        info = model_info(config, source, options.name or _default_name(options.model), context)
        info["onnx_export"] = exported.record
        with stages("package bundle (each artifact gated on the staged bundle)"):
            checkpoint = weights.decoder_params(source.model_dir, config)
            blobs = {}
            for precision in dtypes:
                values = checkpoint
                if precision == "int8":
                    values = quantized.quantize_params(named[precision], checkpoint)
                if precision == "int4":
                    gguf_path = Path(source.origin) if source.kind == "gguf" else None
                    values, record = gguf_int4.int4_params(
                        named[precision], checkpoint, config, gguf_path
                    )
                    info.setdefault("quantization", {})["int4"] = record
                names = [n for n, _ in named[precision]]
                arrays = weights.ordered_params(named[precision], values, str(source.model_dir))
                blob = package.weights_blob(names, [_tensor(a) for a in arrays])
                blobs[precision] = (names, blob)
                del values, arrays
            del checkpoint
            out = package.write_bundle(
                options.output,
                exported.onnx_path,
                blobs,
                entries,
                info,
                [],
                tokenizer_dir=source.model_dir,
                export_parity=export_parity,
                check_staged=gate(references, options.strict_parity, stages, heldout),
            )
    logger.info("bundle written: %s", out)
    return out


def reference_runs(
    model_dir: Path, config: DecoderConfig, exported, context: int
) -> tuple[References, dict | None]:
    """Both references on the gate's prompts, once each, and the export's own parity against
    transformers. An export that disagrees with transformers is left out of the bundle (a
    fallback engine must not give other text than the model): `exported` loses its graph and
    its record says why."""
    prompts = parity.prompt_ids(model_dir, config.vocab_size)
    cases = parity.reference_cases(model_dir, prompts)
    if exported.onnx_path is None:
        return References(prompts, cases, None, exported.record.get("detail", "")), None
    ort_cases = parity.onnx_reference_cases(exported.onnx_path, prompts, context)
    record = parity.compare(cases, parity.as_observed(ort_cases), "native")
    record.update(reference="pytorch", engine="onnxruntime")
    logger.info("  export: ONNX Runtime vs transformers: %s", parity.summary(record))
    if not record["ok"]:
        why = f"its parity against transformers failed: {parity.summary(record)}"
        logger.warning("  the ONNX export is left out of the bundle: %s", why)
        exported.onnx_path = None
        exported.record = {"file": None, "detail": f"left out: {why}"}
        return References(prompts, cases, None, exported.record["detail"]), record
    return References(prompts, cases, ort_cases), record


def reference_heldout(model_dir: Path):
    """(held-out token ids, transformers fp32's perplexity on them, their source) for the
    quantized gate; no ids (and the reason as the source) when none can be had."""
    from tvmdeploy.runtime.paths import cache_dir

    texts, source = quality.heldout_ids(model_dir, cache_dir() / "data")
    if not texts:
        logger.info("  perplexity not measured: %s", source)
    return texts, quality.reference_perplexity(model_dir, texts), source


def _tensor(array):
    import tvm

    return tvm.runtime.tensor(array)


def _default_name(model: str) -> str:
    path = Path(model)
    return path.stem if path.suffix.lower() == ".gguf" else path.name
