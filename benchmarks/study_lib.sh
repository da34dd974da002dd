# Sourced by the study scripts (camvid_study.sh, camvid_boxes_study.sh); they set PY, DATA, WORK.
# COMPARE_ARGS (optional, split on spaces): more options of its compare.py call (the tests: --quick).
#
# at_choice CONFIG STUDY NAME ROW FROM [RUN_DIR...]: a controlled row. ROW trained at FROM's ID-val
# choice (every other row as STUDY's search chose), reported with FT (and FROM) in $WORK/NAME. A
# searched ablation answers "how good is the best-tuned variant"; this one answers "what does the
# removed part do at the method's own setting". The listed run folders of STUDY (e.g. FT DAFT) are
# linked, not copied, so only the new runs train.
at_choice() {
  local config=$1 study=$2 dir=$WORK/$3 row=$4 from=$5 run; shift 5
  mkdir -p "$dir/runs"
  for run in "$@"; do ln -sfn "$(realpath "$study/runs/$run")" "$dir/runs/$run"; done
  "$PY" - "$study/search.json" "$dir/search_controlled.json" "$row" "$from" <<'END'
import json, sys
record = json.load(open(sys.argv[1]))
row, source = sys.argv[3], sys.argv[4]
record['chosen'][row] = dict(record['chosen'][source])
record['source'] = (f"hand-set for a controlled comparison: {row!r} at {source}'s ID-val "
                    "choice, every other row as chosen by " + record['source'])
json.dump(record, open(sys.argv[2], 'w'), indent=1)
END
  local rows=(FT)
  [[ $from == FT ]] || rows+=("$from")
  "$PY" tools/compare.py "$config" --recorded "$dir/search_controlled.json" \
      --rows "${rows[@]}" "$row" --no-budget-check --work-dir "$dir" \
      ${COMPARE_ARGS:-} --cfg-options data_root="$DATA"
}
