#!/bin/bash
# Submit a whole curation run as three dependent job arrays: map (K+1 tasks, M at once) -> dedup reduce
# (R tasks) -> write (K+1 tasks). Each starts only when every task of the one before succeeded; a failed
# task cancels the rest (--kill-on-invalid-dep=yes). Prints the three job ids; a job that needs the curated
# data (tokenizing into shards) depends on the last: --dependency=afterok:<write job>.
#
#   examples/slurm/submit_curation.sh [--reduce-tasks R] [--OPTION=VALUE ...] K M SOURCES.yaml OUTPUT [CURATE.yaml]
#
# --OPTION=VALUE: passed to all three sbatch calls (--partition=..., --account=..., --time=...).
# R defaults to 16; tasks beyond the config's dedup.partitions have nothing to do.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
reduce_tasks=16
opts=()
while [ $# -gt 0 ]; do
  case $1 in
    --reduce-tasks) reduce_tasks=${2:?--reduce-tasks needs a number}; shift 2 ;;
    --reduce-tasks=*) reduce_tasks=${1#--reduce-tasks=}; shift ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    --*=*) opts+=("$1"); shift ;;
    -*) echo "submit_curation.sh: unknown option $1 (sbatch options go as --option=value)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [ $# -lt 4 ]; then
  echo "usage: submit_curation.sh [--reduce-tasks R] [--OPTION=VALUE ...] K M SOURCES.yaml OUTPUT [CURATE.yaml]" >&2
  exit 2
fi
last=$1 throttle=$2
shift 2
for n in "$last" "$throttle" "$reduce_tasks"; do
  [[ $n =~ ^[0-9]+$ ]] || { echo "submit_curation.sh: K, M and R must be numbers, got '$n'" >&2; exit 2; }
done
[ "$reduce_tasks" -ge 1 ] || { echo "submit_curation.sh: --reduce-tasks must be >= 1" >&2; exit 2; }
[ -f "$1" ] || { echo "submit_curation.sh: sources file $1 does not exist" >&2; exit 2; }

map=$(sbatch --parsable "--array=0-$last%$throttle" "${opts[@]}" "$here/curate_array.sbatch" map "$@")
map=${map%%;*}
reduce=$(sbatch --parsable "--array=0-$((reduce_tasks - 1))%$throttle" "--dependency=afterok:$map" \
  --kill-on-invalid-dep=yes "${opts[@]}" "$here/dedup_reduce.sbatch" "$@")
reduce=${reduce%%;*}
write=$(sbatch --parsable "--array=0-$last%$throttle" "--dependency=afterok:$reduce" \
  --kill-on-invalid-dep=yes "${opts[@]}" "$here/curate_array.sbatch" write "$@")
echo "$map"
echo "$reduce"
echo "${write%%;*}"
