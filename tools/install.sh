#!/usr/bin/env bash
# Create a virtual environment and install daft-mm's pinned OpenMMLab stack into it (CPU machines;
# the same stack runs on GPUs, see "Install modes" in the README).
#
#   bash tools/install.sh            # .venv, torch 2.13.0 CPU wheel; idempotent (a rerun checks and exits)
#   PYTHON=python3.11 bash tools/install.sh
#   DAFT_MM_WHEELS=/path/to/wheels bash tools/install.sh   # where a prebuilt mmcv wheel may lie
#
# The torch 2.1 lane (the environment OpenMMLab users have; .ci/run's second lane):
#
#   DAFT_MM_TORCH=2.1.2 VENV=~/.cache/daft-mm/venv-py311-torch2.1.2 bash tools/install.sh
#
# Parameters (environment):
#   DAFT_MM_TORCH     torch version to pin (default 2.13.0, the CPU wheel). Any other version gets
#                     PyPI's default wheel for it (for 2.1.2 a CUDA 12.1 build, which runs on CPUs too).
#   VENV              where the environment lives (default: <repo>/.venv).
#   DAFT_MM_EDITABLE  1: `pip install -e .` this clone into it (default for <repo>/.venv);
#                     0: leave daft-mm out and run with PYTHONPATH=<clone> (default elsewhere, so
#                     that a venv shared by several clones never points at one of them).
#   DAFT_MM_WHEELS    folder of prebuilt mmcv 2.1.0 wheels (default ../shared/wheels): the one for
#                     torch 2.13.0 in it, for any other torch in its torch-<version>/ subfolder;
#                     without a matching wheel mmcv is built from source (and kept for next time).
#
# Order matters: torch is pinned first (a bare `torch` would pull a CUDA build), then mmcv, whose
# source build needs torch and pkg_resources (setuptools < 82) in the same environment; then the rest
# under a constraint that keeps that torch.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3.11}"
DEFAULT_TORCH=2.13.0
TORCH="${DAFT_MM_TORCH:-$DEFAULT_TORCH}"
VENV="${VENV:-$ROOT/.venv}"
if [[ "$VENV" == "$ROOT/.venv" ]]; then EDITABLE="${DAFT_MM_EDITABLE:-1}"; else EDITABLE="${DAFT_MM_EDITABLE:-0}"; fi
# The shared wheel folder holds the mmcv wheel for the default torch, and one per other torch in
# torch-<version>/ (mmcv's compiled ops only load with the torch they were built against).
WHEELS="${DAFT_MM_WHEELS:-$ROOT/../shared/wheels}"
if [[ "$TORCH" != "$DEFAULT_TORCH" ]]; then WHEELS="$WHEELS/torch-$TORCH"; fi
STAMP="$VENV/.daft-mm-install-stamp"
# Run from the clone in both modes: with EDITABLE=0 daft_mm comes from PYTHONPATH.
CHECK="import torch, daft_mm, mmcv.ops, mmseg.models, mmdet.models
assert torch.__version__.split('+')[0] == '$TORCH', f'torch {torch.__version__} is installed, not $TORCH'"

# mmcv wheels built from source here, one folder per torch (their ops only load with that torch).
BUILT="${XDG_CACHE_HOME:-$HOME/.cache}/daft-mm/wheels/torch-$TORCH"

say() { printf '[install] %s\n' "$*"; }
check() { PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -c "$CHECK"; }

want_stamp() {
  # What the environment depends on: never the clone's path, so that another clone reuses it.
  { cat tools/install.sh requirements.txt requirements-test.txt
    if [[ "$EDITABLE" == 1 ]]; then cat setup.py; fi
    echo "torch=$TORCH editable=$EDITABLE"; } | sha256sum | cut -d' ' -f1
}

# Two runs on one machine (two CI jobs sharing the cached lane venv) must not install at once.
mkdir -p "$VENV"
exec 9>"$VENV/.daft-mm-install.lock"
flock 9

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(want_stamp)" ]] && check 2>/dev/null; then
  say "up to date: $VENV (torch $TORCH)"
  exit 0
fi
rm -f "$STAMP"

if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || { say "ERROR: $PYTHON not found; set PYTHON=python3.11"; exit 1; }
  say "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
# Install mmcv 2.1.0 from a wheel folder; true only if its compiled ops load with this torch.
mmcv_from() {
  [[ -d "$1" ]] && "${PIP[@]}" install -q --force-reinstall --no-index --no-deps --find-links "$1" 'mmcv==2.1.0' 2>/dev/null \
    && "$PY" -c 'import mmcv.ops' 2>/dev/null
}
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' || {
  say "ERROR: $VENV must be Python 3.11 (the pinned torch wheels and the mmcv wheels are cp311);"
  say "       remove $VENV and rerun with PYTHON=python3.11"; exit 1; }

# Every pip call below keeps this torch: nothing may upgrade or replace it.
CONSTRAINTS="$VENV/.daft-mm-torch-constraint.txt"
echo "torch==$TORCH" > "$CONSTRAINTS"

say "step 1/5: build tools (setuptools<82 keeps pkg_resources for mmengine and mmcv's build)"
"${PIP[@]}" install -q 'pip>=23' 'setuptools>=77.0.3,<82' wheel ninja

if [[ "$TORCH" == "$DEFAULT_TORCH" ]]; then
  say "step 2/5: torch==$TORCH (CPU wheel)"
  "${PIP[@]}" install -q "torch==$TORCH"
  "$PY" -c 'import torch; assert not torch.version.cuda, "a CUDA build of torch was installed"'
else
  say "step 2/5: torch==$TORCH (PyPI's default wheel; several GB with its CUDA libraries, which a CPU machine does not use)"
  "${PIP[@]}" install -q "torch==$TORCH"
fi

say "step 3/5: mmcv==2.1.0 with CPU ops, compiled for torch $TORCH"
if "$PY" -c 'import mmcv, mmcv.ops; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
  say "mmcv 2.1.0 with ops already present"
else
  # mmengine and mmcv's other runtime needs first, so that the mmcv step does not touch torch.
  "${PIP[@]}" install -q -c "$CONSTRAINTS" 'mmengine==0.10.7' 'numpy==1.26.4' 'opencv-python==4.10.0.84' \
    addict packaging Pillow pyyaml yapf
  if mmcv_from "$WHEELS"; then
    say "installed the prebuilt wheel from $WHEELS"
  elif mmcv_from "$BUILT"; then
    say "installed the wheel built here earlier, from $BUILT"
  else
    # pip's own wheel cache is keyed by the sdist, not by torch: a wheel built against another
    # torch would be reused and fail to import. So the build goes to a folder per torch version.
    say "no matching prebuilt wheel in $WHEELS: building mmcv 2.1.0 from source with CPU ops into $BUILT."
    say "This takes 30-45 minutes on 2 cores; compiler lines follow. The wheel is kept for next time."
    mkdir -p "$BUILT"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "${PIP[@]}" wheel -v --no-deps --no-build-isolation --no-binary mmcv --no-cache-dir -w "$BUILT" 'mmcv==2.1.0' 2>&1 \
      | grep --line-buffered -E 'Building|building|gcc|g\+\+|c\+\+|Successfully|ERROR|error:|Saved' || true
    mmcv_from "$BUILT" || { say "ERROR: mmcv build failed; see the output above"; exit 1; }
  fi
fi

say "step 4/5: mmengine, mmsegmentation, mmdet and the rest of requirements.txt (torch kept at $TORCH)"
# requirements.txt pins the default lane's torch; the constraint file pins this one's.
REQS="$VENV/.daft-mm-requirements.txt"
grep -v -E '^torch[=<>~ ]' requirements.txt > "$REQS"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -r "$REQS" -r requirements-test.txt

if [[ "$EDITABLE" == 1 ]]; then
  say "step 5/5: daft-mm in editable mode"
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
else
  say "step 5/5: daft-mm not installed into $VENV (run with PYTHONPATH=<clone>)"
fi

check
want_stamp > "$STAMP"
say "done: $VENV ($(PYTHONPATH="$ROOT" "$PY" -c 'import torch, mmcv, mmseg, mmdet; print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmseg {mmseg.__version__}, mmdet {mmdet.__version__}")'))"
