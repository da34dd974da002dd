# Sourced by tools/dist_train.sh, dist_test.sh and slurm_train.sh: the interpreter they run.
# PYTHON if set; else the project's own .venv (made by tools/install.sh) when it exists; else
# python, then python3, from PATH. A missing interpreter is named with the fix.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$TOOLS/../.venv/bin/python" ]]; then
    PYTHON="$TOOLS/../.venv/bin/python"
  elif command -v python >/dev/null 2>&1; then
    PYTHON=python
  elif command -v python3 >/dev/null 2>&1; then
    PYTHON=python3
  else
    echo "$0: no Python interpreter: no .venv in $(cd "$TOOLS/.." && pwd), and neither python" \
         "nor python3 on PATH. Fix: make install (creates .venv), activate your environment," \
         "or PYTHON=/path/to/python bash $0 ..." >&2
    exit 2
  fi
fi
