#!/usr/bin/env bash
# Distilled 10-minute run on 8 x H100 against a precomputed teacher cache (distill teacher precompute).
#   scripts/train_kd_8xh100.sh CACHE_DIR [extra overrides, e.g. --kd-alpha 0.3 --out runs/kd_a03]
# The cache must have been built from exactly these train shards and this tokenizer (checked at start).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${1:?usage: $0 CACHE_DIR [--key value ...]}"
shift
exec accelerate launch --config_file scripts/accelerate/8xh100.yaml \
  -m student.train --config configs/kd_8xh100.toml --teacher-cache "$cache" "$@"
