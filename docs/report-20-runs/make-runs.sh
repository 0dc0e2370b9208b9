#!/usr/bin/env bash
# The 20 real runs behind the report figures in README.md (issue 20): 16 adult-married runs of 4
# rounds (eight configurations x seeds 0 and 1) and 4 imaging runs of 3 rounds. About 12 minutes
# on 2 CPU cores. Usage, from the repository root with fedlowrank installed ([plot,imaging,dp]):
#   bash docs/report-20-runs/make-runs.sh OUT_DIR && fedlowrank report OUT_DIR/run-*.json --out OUT_DIR/report
set -u
out=$(realpath "${1:?give a folder for the results files}")
mkdir -p "$out"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
i=0
run() {
  app=$1; shift; i=$((i+1))
  echo "== $(date +%T) run $i $app $*"
  fedlowrank run "$app" --run-config "$* results-file='$out/run-$i.json'" > "$out/log-$i.txt" 2>&1; echo "rc=$?"
}
for seed in 0 1; do
  for s in "strategy='fedlowrank'" "strategy='fedit'" "strategy='ffa'" "strategy='flora'" \
           "strategy='fedlowrank' client-ranks='2,4'" "strategy='fedlowrank' compression='lgreco'" \
           "strategy='fairlora-exact' groups=2" "strategy='fedlowrank' dp-noise-multiplier=0.8"; do
    run adult-married "num-server-rounds=4 seed=$seed $s"
  done
done
for seed in 0 1; do
  run fairlora-images "num-server-rounds=3 seed=$seed site-images=200"
  run fairlora-images "num-server-rounds=3 seed=$seed site-images=200 strategy='fairlora-paper'"
done
