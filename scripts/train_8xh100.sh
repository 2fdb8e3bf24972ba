#!/usr/bin/env bash
# The challenge baseline on one 8 x H100 node, 600 s wall-clock cap (openai/parameter-golf train_gpt.py).
#   scripts/train_8xh100.sh [extra overrides, e.g. --seed 42 --out runs/b42]
# Data: the official sp1024 shards + tokenizer under data/ (see configs/baseline_sp1024.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file scripts/accelerate/8xh100.yaml \
  -m student.train --config configs/baseline_sp1024.toml "$@"
