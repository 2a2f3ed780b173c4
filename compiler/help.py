"""Help text of the `tvmdeploy` command's options, in one place (so cli.py stays readable)."""

HELP = {
    "model": "A local Hugging Face model directory, or an .onnx file from any exporter "
    "(torch.onnx.export, Optimum, ONNX Runtime's optimizer or quantizers; docs/compatibility.md). "
    "For text generation: a causal-LM folder (Llama, Mistral, Qwen2, Phi-3, GPT-2), a LoRA "
    "adapter folder (with --base), or a .gguf file.",
    "base": "The base model folder of a LoRA adapter (default: the local folder its "
    "adapter_config.json names); the adapter is merged at compile time.",
    "context": "Tokens of context (prompt + completion) a generation bundle serves; its KV cache "
    "is sized by it (default: the model's limit, at most 4096).",
    "no_strict_parity": "Keep artifacts whose parity check or quantized gate failed, the failure "
    "recorded in the manifest (default: such a compile fails and writes no bundle).",
    "no_onnx": "Generation bundles: leave out the model's ONNX export (a smaller bundle, and no "
    "ONNX Runtime engine to fall back on or to check the compiled model against).",
    "gen_bundle": "A generation bundle (compiled from a causal LM).",
    "prompt": "The prompt text.",
    "max_new_tokens": "Most tokens to generate.",
    "temperature": "Sampling temperature; 0 (default) is greedy.",
    "top_k": "Sample from the k most likely tokens only (0: all).",
    "top_p": "Sample from the smallest set of tokens whose probability reaches p (1: all).",
    "repetition_penalty": "Penalty on tokens already in the text (1: none; 1.1 is common).",
    "stop": "Stop at this string (not included); repeat for several.",
    "seed": "Random seed for sampling: the same seed gives the same text.",
    "chat_template": "Wrap the prompt as one user message in the model's chat template.",
    "system": "A system message (chat).",
    "no_stream": "Print the text at the end instead of as it is generated.",
    "generate_json": "Print the result (text, tokens, finish reason, timings) as JSON.",
    "output": "Bundle directory to write (NAME.tvmd).",
    "profiles": "Target profile; repeat for several. 'host' = best for this machine. "
    "See `tvmdeploy targets`.",
    "task": "Optimum task (e.g. text-classification); inferred from config.json by default.",
    "buckets": "Shape buckets as BATCHES x SEQS, e.g. '1,4x32,64,128,256'; join groups with ';'. "
    "Default: batch 1,4 x seq 32,64,… up to the model's longest sequence (at most 512). "
    "Longer inputs, up to the model's limit, run through a symbolic-length function in each "
    "artifact (untuned).",
    "tune_buckets": "Shape buckets as BATCHES x SEQS, the same as you will compile (default: from "
    "the model, as compile does).",
    "opset": "ONNX opset for the export.",
    "tune_trials": "MetaSchedule trials per profile (0 = rule-based default schedules).",
    "no_verify": "Skip the parity check against ONNX Runtime.",
    "name": "Model name recorded in the manifest.",
    "rpc": "TVM RPC tracker HOST:PORT of a remote device (with --rpc-key).",
    "rpc_key": "Key of the device's rpc_server at the tracker.",
    "compile_rpc": "TVM RPC tracker HOST:PORT of a remote device (with --rpc-key): artifacts of "
    "its "
    "arch are verified (and tuned) there.",
    "precision": "Precisions to build, comma-separated: fp32 (default), int8 (x86 and ARM CPUs: "
    "VNNI, AVX-512, AVX2, sdot or NEON kernels, chosen per profile), bf16 (the AVX-512 x86 "
    "profiles; the artifact needs AVX512-BF16), fp16 (CUDA profiles). Causal LMs: fp32, int8 "
    "and int4 (weight-only, CPU and CUDA profiles, gated by greedy agreement and perplexity "
    "against fp32; int4 keeps a GGUF file's Q4_0/Q4_1 blocks as they are). One "
    "artifact per profile and precision; the runtime picks with load(precision=...).",
    "bench_precision": "Which precision's artifact to time: auto (what load() takes), fp32, "
    "int8, int4, bf16, fp16.",
    "eval_data": "Labelled examples (JSONL with text and label, or a CSV with text,label columns): "
    "each artifact's task accuracy is measured against fp32 and recorded in the bundle; "
    "load(precision='auto') takes a reduced precision only when it is within --accuracy-gate.",
    "accuracy_gate": "Accuracy points a reduced precision may lose against fp32 and still be "
    "chosen by load(precision='auto').",
    "vocab_size": "The vocabulary size (token ids accepted: 0..N-1), where neither the graph "
    "(the table input_ids gathers, through dequantize chains) nor a config.json beside the "
    "ONNX file tells it. Given, it wins over both.",
    "type_vocab_size": "Token type ids accepted (0..N-1), where the graph does not tell it.",
    "max_positions": "The longest sequence the model takes (buckets stop there), where neither "
    "config.json nor the position table tells it.",
    "compile_json": "Print the written bundle's manifest as JSON on stdout.",
    "tune_profile": "CPU target profile this machine (or the --rpc device) can run; 'host' = best "
    "for this machine.",
    "trials": "Trial budget for this model's kernels, counting records already in the cache "
    "(a rerun continues).",
    "minutes": "Wall-time budget for this run, in minutes.",
    "export_records": "Also write this model's best records (one per kernel) to this directory, "
    "e.g. to ship them.",
    "tune_rpc": "TVM RPC tracker HOST:PORT of a remote device (with --rpc-key): every candidate "
    "is timed there (network excluded).",
    "tune_rpc_key": "Key of the device's rpc_server at the tracker; its records go to a cache of "
    "their own (rpc-KEY), which `compile --rpc` reads.",
    "tune_json": "Print the run's summary as JSON on stdout (trials, records, cache, and where the "
    "trials were measured).",
    "records_dir": "A tuning-record directory (database_*.json, rule_based.json); default: the "
    "records shipped for the profile.",
    "check_profile": "CPU target profile the records are for; this machine must run its code.",
    "rounds": "Times each schedule is measured (alternately); the best of them is compared.",
    "prune": "Rewrite the directory with only the records that beat the rule-based schedule "
    "here, and note the check in its meta.json.",
    "min_gain": "Rule-based time / record time a record must reach here to be kept.",
    "check_json": "Print one row per record as JSON on stdout.",
    "bundle": "Bundle directory.",
    "compare": "Baselines to time beside tvmdeploy: onnxruntime, torch (comma-separated, or ''). "
    "Default onnxruntime; none with --rpc (baselines run only locally).",
    "batch": "Batch sizes, comma-separated.",
    "seq": "Sequence lengths, comma-separated.",
    "warmup": "Untimed warm-up runs per case.",
    "runs": "Timed runs per case.",
    "artifact": "Force a tvmdeploy artifact (profile name).",
    "torch_model": "HF model directory for the PyTorch baseline (default: the manifest's source).",
    "bench_json": "Write the versioned JSON report here.",
    "bench_rpc": "TVM RPC tracker HOST:PORT of a remote device (with --rpc-key): tvmdeploy is "
    "timed there (network excluded).",
    "rpc_timeout": "Seconds the remote session may last.",
    "inspect_json": "Print the raw manifest as JSON.",
    "check": "Verify every file's sha256.",
    "targets_json": "Print the profiles as JSON.",
    "work_dir": "Where the fine-tuned model, bundle and results are cached.",
    "demo_profile": "Target profile for the demo bundle.",
    "epochs": "Fine-tuning epochs (first run only; the model is cached).",
    "demo_json": "Print the results (accuracy, latency, choice) as JSON on stdout.",
    "demo_gen": "Also compile SmolLM2-135M-Instruct for this machine, "
    "stream two answers, time them beside PyTorch and ONNX Runtime (cached after the first run).",
    "bench_files": "Bench JSONs written by `tvmdeploy bench --json`, e.g. one per device.",
    "html": "Self-contained HTML page to write (plots inline, no external URLs).",
    "md": "Markdown tables to write.",
    "report_json": "Print the merged rows (with speed-ups) as JSON on stdout.",
    "private_key": "Ed25519 private key file to write (PEM, mode 0600).",
    "public_key_out": "Public key file to write (default: PRIVATE with .pub).",
    "sign_key": "Ed25519 private key (from `tvmdeploy keygen`).",
    "verify_keys": "Trusted public key (file or 64 hex digits); repeat for several. Without it "
    "the signature is only reported.",
    "verify_json": "Print the checks as JSON on stdout.",
    "serve_bundles": "Bundles to serve, each as BUNDLE (served under its file name without .tvmd) "
    "or NAME=BUNDLE.",
    "host": "Address to listen on (0.0.0.0 for every interface).",
    "port": "TCP port to listen on.",
    "serve_precision": "Which precision's artifacts to load: auto (what load() takes), fp32, "
    "int8, int4, bf16, fp16.",
    "max_batch_delay_ms": "How long a request waits for others to share its batch (ms); batches "
    "hold up to the largest bucket's batch.",
    "max_queue": "Rows that may wait per model; past it a request gets 429 with Retry-After.",
    "api_key": "Require 'Authorization: Bearer KEY' on every route but health (default: "
    "$TVMDEPLOY_API_KEY).",
    "trusted_key": "Trusted public key (file or 64 hex digits); repeat for several. Every bundle "
    "must be signed by one of them, or nothing is served (default: $TVMDEPLOY_TRUSTED_KEYS).",
    "serve_ray": "Run on the Ray cluster at this address (auto, HOST:PORT, ray://HOST:PORT, or "
    "local to start one here) behind Ray Serve's HTTP proxy, which listens on --host/--port "
    "(needs the serve-ray extra).",
    "prefix_cache": "Generation bundles: keep finished sequences in the KV cache, so a prompt "
    "that begins with one of them (a chat's history, a shared system prompt) prefills only the "
    "rest; the usage reports prompt_tokens_details.cached_tokens.",
    "replicas": "With --ray: replicas of the bundles, each on the node Ray places it on.",
    "replica_cpus": "With --ray: CPUs each replica reserves (and TVM threads it runs).",
    "verbose": "Debug logging, and tracebacks with errors.",
    "quiet": "Only warnings and errors on stderr.",
}
