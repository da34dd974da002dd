#!/usr/bin/env bash
# Create .venv and install daft-mm with its pinned OpenMMLab stack (CPU only).
#
#   bash tools/install.sh            # idempotent: a second run only checks and exits
#   PYTHON=python3.11 bash tools/install.sh
#   DAFT_MM_WHEELS=/path/to/wheels bash tools/install.sh   # where a prebuilt mmcv wheel may lie
#
# Order matters: torch is pinned first (a bare `torch` would pull a CUDA build), then mmcv, whose
# source build needs torch and pkg_resources (setuptools < 82) in the same environment.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
WHEELS="${DAFT_MM_WHEELS:-$ROOT/../shared/wheels}"
STAMP="$VENV/.daft-mm-install-stamp"
CHECK='import daft_mm, mmseg.models, mmdet.models'

say() { printf '[install] %s\n' "$*"; }

want_stamp() {
  cat tools/install.sh requirements.txt requirements-test.txt setup.py | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]] \
   && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  say "up to date: $VENV"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; set PYTHON=python3.11"; exit 1; }
  say "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  say "ERROR: .venv must be Python 3.11 (the torch 2.13.0 CPU wheel and the mmcv wheel are cp311);"
  say "       remove .venv and rerun with PYTHON=python3.11"; exit 1; }

say "step 1/5: build tools (setuptools<82 keeps pkg_resources for mmengine and mmcv's build)"
"${PIP[@]}" install -q 'pip>=23' 'setuptools>=77.0.3,<82' wheel ninja

say "step 2/5: torch==2.13.0 (CPU wheel)"
"${PIP[@]}" install -q 'torch==2.13.0'
"$PY" -c 'import torch; assert not torch.version.cuda, "a CUDA build of torch was installed"'

say "step 3/5: mmcv==2.1.0 with CPU ops"
if "$PY" -c 'import mmcv, mmcv.ops; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
  say "mmcv 2.1.0 with ops already present"
else
  # mmengine and mmcv's other runtime needs first, so that the mmcv step does not touch torch.
  "${PIP[@]}" install -q 'mmengine==0.10.7' 'numpy==1.26.4' 'opencv-python==4.10.0.84' addict packaging Pillow pyyaml yapf
  if [[ -d "$WHEELS" ]] && "${PIP[@]}" install -q --no-index --no-deps --find-links "$WHEELS" 'mmcv==2.1.0' 2>/dev/null \
     && "$PY" -c 'import mmcv.ops' 2>/dev/null; then
    say "installed the prebuilt wheel from $WHEELS"
  else
    say "no matching prebuilt wheel in $WHEELS: building mmcv 2.1.0 from source with CPU ops."
    say "This takes 30-45 minutes on 2 cores; compiler lines follow. pip caches the wheel for next time."
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${PIP[@]}" install -v --no-deps --no-build-isolation 'mmcv==2.1.0' 2>&1 \
      | grep --line-buffered -E 'Building|building|gcc|g\+\+|c\+\+|Successfully|ERROR|error:|Stored in|Using cached' || true
    "$PY" -c 'import mmcv.ops' || { say "ERROR: mmcv build failed; see the output above"; exit 1; }
  fi
fi

say "step 4/5: mmengine, mmsegmentation, mmdet and the rest of requirements.txt"
"${PIP[@]}" install -q -r requirements.txt -r requirements-test.txt

say "step 5/5: daft-mm in editable mode"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .

"$PY" -c "$CHECK"
want_stamp > "$STAMP"
say "done: $VENV ($("$PY" -c 'import torch, mmcv, mmseg, mmdet; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmseg {mmseg.__version__}, mmdet {mmdet.__version__}")'))"
