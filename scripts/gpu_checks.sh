#!/usr/bin/env bash
# GPU checks: CUDA detection and the TensorRT backend (build, execute, plan cache) on a GPU machine.
#
#   scripts/gpu_checks.sh [extra pytest args]
#
# 1. prints nvidia-smi (or why there is none);
# 2. installs aimaas[dev,gpu] into ./.venv (cuda-bindings matched to the driver's CUDA major version);
# 3. tries NVIDIA's full TensorRT wheel (tensorrt-cu12 / tensorrt-cu13 by the driver's CUDA version).
#    Its libraries are fetched from NVIDIA's own package index at install time, so this step can fail
#    on a machine without access to it; the checks then report "tensorrt is not installed" and skip.
#    Pre-install TensorRT yourself (or set TENSORRT_PACKAGE, e.g. "tensorrt-cu12==10.13.*") to avoid that;
# 4. runs `pytest -m gpu tests/gpu -rs`: without a GPU or TensorRT every test skips with the reason.
#
# Environment: PYTHON (interpreter for the venv, default python3), GPU_CHECKS_SKIP_INSTALL=1 (use the
# existing environment as is), TENSORRT_PACKAGE (pip requirement for TensorRT; "none" skips it).
# Safe on machines without a GPU: nothing here fails because a GPU, a driver or TensorRT is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

echo "==> nvidia-smi"
cuda_major=""
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi || echo "nvidia-smi failed: the driver is not usable (GPU checks will skip)"
  cuda_major="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1)"
else
  echo "nvidia-smi not found: no NVIDIA driver on this machine (GPU checks will skip)"
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv || { echo "error: could not create .venv" >&2; exit 1; }
fi
py=.venv/bin/python
pip_quiet=(-q --disable-pip-version-check --retries 1 --timeout 30)

if [ "${GPU_CHECKS_SKIP_INSTALL:-0}" != "1" ]; then
  echo "==> installing aimaas[dev,gpu]"
  if ! "$py" -m pip install "${pip_quiet[@]}" -e ".[dev,gpu]"; then
    echo "warning: aimaas[dev,gpu] did not install; trying aimaas[dev]" >&2
    "$py" -m pip install "${pip_quiet[@]}" -e ".[dev]" || { echo "error: aimaas[dev] did not install" >&2; exit 1; }
  fi

  # cuda-bindings N.x statically links the CUDA N runtime, which needs a driver for CUDA >= N.
  if [ -n "$cuda_major" ]; then
    echo "==> driver supports CUDA ${cuda_major}: installing cuda-bindings ${cuda_major}.x"
    "$py" -m pip install "${pip_quiet[@]}" "cuda-bindings==${cuda_major}.*" \
      || echo "warning: no cuda-bindings ${cuda_major}.x wheel; keeping the installed one" >&2
  fi

  trt_package="${TENSORRT_PACKAGE:-}"
  if [ -z "$trt_package" ]; then
    if [ "${cuda_major:-0}" -ge 13 ] 2>/dev/null; then trt_package="tensorrt-cu13"; else trt_package="tensorrt-cu12"; fi
  fi
  if [ "$trt_package" = "none" ]; then
    echo "==> TENSORRT_PACKAGE=none: not installing TensorRT"
  elif "$py" -c "import tensorrt" >/dev/null 2>&1; then
    echo "==> TensorRT already installed: $("$py" -c 'import tensorrt; print(tensorrt.__version__)')"
  elif [ -z "$cuda_major" ]; then
    echo "==> no NVIDIA driver: not installing TensorRT (it cannot run here)"
  else
    echo "==> trying NVIDIA's TensorRT wheel: pip install ${trt_package}"
    # The -libs package downloads NVIDIA's shared libraries during install; allow it ten minutes.
    if ! timeout 600 "$py" -m pip install "${pip_quiet[@]}" "$trt_package"; then
      echo "warning: ${trt_package} did not install (NVIDIA's package index unreachable?); TensorRT checks will skip" >&2
    fi
  fi
fi

echo "==> environment"
"$py" - <<'EOF'
from services.inference.backends import cuda
from services.inference.backends.tensorrt import TensorRTBackend, tensorrt_version

gpus = cuda.detect_gpus()
for gpu in gpus:
    print(f"gpu {gpu.index}: {gpu.name} {gpu.arch} {gpu.total_memory_bytes / 2**30:.1f} GiB")
if not gpus:
    print(f"no GPU: {cuda.gpu_unavailable_reason()}")
print(f"tensorrt: {tensorrt_version() or 'not installed'}")
print(f"TensorRT backend: {TensorRTBackend.probe() or 'available'}")
EOF

echo "==> pytest -m gpu tests/gpu -rs"
"$py" -m pytest -p no:cacheprovider -m gpu tests/gpu -rs "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "error: pytest collected no GPU tests" >&2
  exit 1
fi
exit "$code"
