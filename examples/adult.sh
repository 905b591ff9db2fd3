#!/usr/bin/env bash
# Your own table to an online AUC, on examples/adult.csv (docs/your-data.md walks through it).
#   bash examples/adult.sh [OUT]        (from the repository's root; OUT defaults to out/adult)
set -euo pipefail
OUT=${1:-out/adult}
PY=${PYTHON:-.venv/bin/python}
if [ -e "$OUT" ]; then echo "$OUT exists: remove it or give another folder" >&2; exit 2; fi

# 1. the table -> feature log, action log, feature config (and dead letters, if any)
$PY -m dataflow.data table --input examples/adult.csv --label income --positive '>50K' \
    --na_values '?' --ignore fnlwgt --out "$OUT"
# 2. join requests and clicks into an example log
$PY -m dataflow join --features "$OUT/feature_log/*.avro" --actions "$OUT/action_log/*.avro" \
    --config "$OUT/feature_config.yaml" --out "$OUT/joined"
# 3. train on it in event-time order; each batch is scored before it is learned (online AUC)
$PY -m dataflow.train backfill --input "$OUT/joined/examples/*.avro" \
    --config "$OUT/feature_config.yaml" --metrics_dir "$OUT/train"
cat "$OUT/train/online-backfill-totals.json"
