#!/usr/bin/env bash
# The 1.0611 record's student (configs/record_sp8192.toml) on one 8 x H100 node, 600 s wall-clock cap.
#   scripts/train_record_8xh100.sh [extra overrides, e.g. --seed 0 --out runs/rec0 --teacher-cache DIR]
# Data: CaseOps shards + original-byte sidecars (`distill data build --caseops`, see README) under data/.
# optim.muon_sharded = true: Muon reduce-scatters / all-gathers its own gradients (no DDP wrapper).
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file scripts/accelerate/8xh100.yaml \
  -m student.train --config configs/record_sp8192.toml "$@"
