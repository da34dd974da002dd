#!/usr/bin/env bash
# Go on with a study that outlasts a session, on whatever machine this is: restore the trials it
# carries in benchmarks/trials/, run its script with the code that made them, and save what it
# makes back into benchmarks/trials/ every SAVE_EVERY seconds and at the end (commit them).
#
#   bash benchmarks/resume_study.sh STUDY_SCRIPT DATA_ROOT WORK_ROOT
#   bash benchmarks/resume_study.sh benchmarks/camvid_study.sh /work/data/CamVid /work/bench/b1200
#
# Every compare work dir the study writes under WORK_ROOT is carried as benchmarks/trials/<its
# folder name>/. The script and the code come from the commit its manifests record (one commit
# per study; a worktree where the manifests say the code was, else WORK_ROOT/code); a study with
# nothing carried yet runs from HEAD (or from the worktree it began in).
# The trial keys hold DATA_ROOT's and WORK_ROOT's absolute paths: use the same ones every session
# (benchmarks/trials/README.md lists them). Environment: PYTHON (default .venv/bin/python),
# SAVE_EVERY (default 900).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
[[ $# -eq 3 ]] || { echo "usage: $0 STUDY_SCRIPT DATA_ROOT WORK_ROOT" >&2; exit 2; }
SCRIPT=$1
DATA=$(realpath -m "$2")
WORK=$(realpath -m "$3")
PY=${PYTHON:-.venv/bin/python}
[[ $PY == /* ]] || PY=$REPO/$PY  # absolute, a venv's link kept (the study runs elsewhere)
SAVE_EVERY=${SAVE_EVERY:-900}
TRIALS=$REPO/benchmarks/trials
say() { printf '[resume_study] %s\n' "$*"; }

# the study's carried trials: their folders, the commit and the checkout that made them (all agree)
folders=(); dirs=(); commits=(); codes=()
for m in "$TRIALS"/*/manifest.json; do
  [[ -f $m ]] || continue
  IFS=$'\x1f' read -r dir commit code < <("$PY" -c 'import json,sys; m=json.load(open(sys.argv[1]))
print(m["work_dir"], m.get("commit") or "", m.get("code_dir") or "", sep="\x1f")' "$m")
  [[ $(dirname "$dir") == "$WORK" ]] || continue
  folders+=("$(dirname "$m")"); dirs+=("$dir"); commits+=("$commit"); codes+=("$code")
done
mapfile -t commits < <(printf '%s\n' "${commits[@]}" | sort -u | sed '/^$/d')
mapfile -t codes < <(printf '%s\n' "${codes[@]}" | sort -u | sed '/^$/d')
if [[ ${#commits[@]} -gt 1 || ${#codes[@]} -gt 1 ]]; then
  say "ERROR: the trials carried for $WORK were made by several commits or checkouts (${commits[*]} ${codes[*]}): a study runs with one"; exit 1
fi
# the checkout where the trials were made (older code's keys hold the backbone's path inside it),
# else one under the work root
CODE=${codes[0]:-$WORK/code}
git worktree prune  # a worktree of a work root since removed
if [[ ${#commits[@]} -eq 1 ]]; then COMMIT=${commits[0]}
elif [[ -d $CODE ]]; then COMMIT=$(git -C "$CODE" rev-parse HEAD)  # begun here, nothing saved yet
else COMMIT=$(git rev-parse HEAD); fi
if [[ ! -d $CODE ]]; then
  git worktree add --detach "$CODE" "$COMMIT" >/dev/null
elif [[ $(git -C "$CODE" rev-parse HEAD) != "$(git rev-parse "$COMMIT")" ]]; then
  say "ERROR: $CODE holds $(git -C "$CODE" rev-parse --short HEAD), not the study's $COMMIT: remove it (git worktree remove $CODE)"; exit 1
fi
say "the study's code: $COMMIT in $CODE"

for i in "${!folders[@]}"; do
  PYTHONPATH=$CODE "$PY" "$REPO/benchmarks/trial_cache.py" restore "${folders[$i]}" "${dirs[$i]}"
done

save() {
  for dir in "$WORK"/*/runs; do
    [[ -d $dir ]] || continue
    dir=$(dirname "$dir")
    PYTHONPATH=$CODE "$PY" "$REPO/benchmarks/trial_cache.py" save "$dir" "$TRIALS/$(basename "$dir")" || true
  done
}
( while sleep "$SAVE_EVERY"; do save; done ) >> "$WORK/resume_study_saves.log" 2>&1 &
SAVER=$!
# (|| true: under set -e a failing command in the trap would turn the study's status into 1, and
# pkill finds no child when the study ends before the saver has started its sleep)
trap '{ pkill -P $SAVER; kill $SAVER; } 2>/dev/null || true; save' EXIT
trap 'exit 143' TERM INT  # a stopped study saves too
cd "$CODE"
PYTHONPATH=$CODE PYTHON=$PY bash "$SCRIPT" "$DATA" "$WORK"
