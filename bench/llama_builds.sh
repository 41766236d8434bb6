#!/usr/bin/env bash
# llama-cpp-python built with other flags, against the package's default build (native
# AVX-512/VNNI, OpenMP), for llama.cpp's prefill: results in bench/llama_builds.md.
#
#   bash bench/llama_builds.sh          # about 17 minutes of builds, then 3 interleaved rounds
#
# Variants: "mkl" (GGML_BLAS with Intel MKL from PyPI: prompts go to MKL's sgemm on weights
# dequantised to float32), "no-openmp" (ggml's own thread pool instead of libgomp) and
# "no-llamafile" (without llamafile's tinyBLAS kernels, which ggml uses for prompt batches).
# Each gets its own venv under $OUT; the project's .venv is the baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenrt/bench/llama-builds}
MODEL=${MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenrt/models/qwen2.5-0.5b-instruct}
VERSION=$(.venv/bin/python -c "import llama_cpp; print(llama_cpp.__version__)")
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
mkdir -p "$OUT"

make_venv() {  # variant, extra packages...
  local venv=$OUT/venv-$1
  shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet numpy typing-extensions diskcache jinja2 "$@"
}

build() {  # variant, CMAKE_ARGS
  local venv=$OUT/venv-$1 started=$SECONDS
  "$venv/bin/python" -c "import llama_cpp" 2>/dev/null && return
  CMAKE_ARGS=$2 "$venv/bin/pip" wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$OUT/wheels-$1"
  "$venv/bin/pip" install --quiet --no-deps "$OUT/wheels-$1"/llama_cpp_python-*.whl
  echo "built $1 in $((SECONDS - started)) s" >&2
}

# MKL's PyPI wheels hold only versioned libraries (libmkl_core.so.3), which CMake's FindBLAS
# does not find by itself: each one is named. Its rpath makes the build work from that venv only.
make_venv mkl mkl mkl-devel mkl-include
lib=$OUT/venv-mkl/lib
mkl_lib() { ls "$lib/lib$1.so".* | head -1; }
build mkl "-DGGML_BLAS=ON -DGGML_BLAS_VENDOR=Intel10_64lp -DBLAS_INCLUDE_DIRS=$OUT/venv-mkl/include \
-DBLAS_mkl_intel_lp64_LIBRARY=$(mkl_lib mkl_intel_lp64) -DBLAS_mkl_intel_thread_LIBRARY=$(mkl_lib mkl_intel_thread) \
-DBLAS_mkl_core_LIBRARY=$(mkl_lib mkl_core) -DBLAS_iomp5_LIBRARY=$lib/libiomp5.so"
make_venv no-openmp
build no-openmp "-DGGML_OPENMP=OFF"
make_venv no-llamafile
build no-llamafile "-DGGML_LLAMAFILE=OFF"

declare -A PYTHON=([baseline]=$REPO/.venv/bin/python [mkl]=$OUT/venv-mkl/bin/python
                   [no-openmp]=$OUT/venv-no-openmp/bin/python [no-llamafile]=$OUT/venv-no-llamafile/bin/python)
for round in 1 2 3; do
  for variant in baseline mkl no-openmp no-llamafile; do
    row=$(PYTHONPATH=$REPO "${PYTHON[$variant]}" bench/tune_engines.py --model "$MODEL" --one llama "{}")
    echo "| $round | $variant ${row#| llama }"
  done
done
