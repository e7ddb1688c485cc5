#!/bin/bash
# Submit a chain of N training jobs that run one after the other and resume from each other's checkpoints.
#
#   examples/slurm/submit_chain.sh [OPTIONS] N [CONFIG] [KEY=VALUE ...]
#
#   --env FILE      geometry + config (examples/slurm/nano-64x8.env, super-512x8.env, ...)
#   --requeue       one job with --requeue that requeues itself up to N-1 times, for clusters that prefer it;
#                   default: N jobs with --dependency=singleton (one job of a name runs at a time)
#   --script FILE   the batch script (default: pretrain.sbatch beside this file)
#   --name NAME     job name = chain name = run directory name (default: the env file's, else the config's)
#   --dry-run       print the sbatch commands, submit nothing
#   --OPTION=VALUE  any other option before N goes to sbatch as it is (--time=..., --partition=..., ...)
#
# Singleton chains: every job has the same name, so Slurm starts job k+1 only when job k has ended, whatever
# its exit code. pretrain.sbatch cancels the jobs still pending when training is complete (exit 0) or has
# failed (exit other than the requeue code); after a requeue exit the next one resumes. Submitting again under
# the same name extends a running chain. Prints one job id per line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/pretrain.sbatch
env_file="" name="" requeue=0 dry=0
sbatch_opts=()

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    --env) env_file=${2:?--env needs a file}; shift 2 ;;
    --env=*) env_file=${1#--env=}; shift ;;
    --script) script=${2:?--script needs a file}; shift 2 ;;
    --script=*) script=${1#--script=}; shift ;;
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --name=*) name=${1#--name=}; shift ;;
    --requeue) requeue=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage ;;
    --*=*) sbatch_opts+=("$1"); shift ;;
    -*) echo "submit_chain.sh: unknown option $1 (sbatch options go as --option=value)" >&2; exit 2 ;;
    *) break ;;
  esac
done

[ $# -ge 1 ] || usage
count=$1
shift
if ! [[ $count =~ ^[1-9][0-9]*$ ]]; then
  echo "submit_chain.sh: N must be a positive number of jobs, got '$count'" >&2
  exit 2
fi
[ -f "$script" ] || { echo "submit_chain.sh: batch script $script does not exist" >&2; exit 2; }

FOLDTRON_CONFIG="" FOLDTRON_JOB_NAME="" FOLDTRON_NODES="" FOLDTRON_GPUS_PER_NODE="" FOLDTRON_TIME=""
FOLDTRON_OVERRIDES=()
if [ -n "$env_file" ]; then
  [ -f "$env_file" ] || { echo "submit_chain.sh: env file $env_file does not exist" >&2; exit 2; }
  # shellcheck source=/dev/null
  . "$env_file"
fi

# CONFIG: the first argument unless it is an override (KEY=VALUE); else the env file's.
config=$FOLDTRON_CONFIG
if [ $# -gt 0 ] && [[ $1 != *=* ]]; then config=$1; shift; fi
if [ -z "$config" ]; then
  echo "submit_chain.sh: no config: give CONFIG or --env FILE with FOLDTRON_CONFIG" >&2
  exit 2
fi
[ -f "$config" ] || { echo "submit_chain.sh: config $config does not exist" >&2; exit 2; }
overrides=("${FOLDTRON_OVERRIDES[@]}" "$@")

if [ -z "$name" ]; then name=${FOLDTRON_JOB_NAME:-$(basename "$config" .yaml)}; fi
geometry=("--job-name=$name")
[ -n "$FOLDTRON_NODES" ] && geometry+=("--nodes=$FOLDTRON_NODES")
if [ -n "$FOLDTRON_GPUS_PER_NODE" ]; then
  geometry+=("--ntasks-per-node=$FOLDTRON_GPUS_PER_NODE" "--gpus-per-node=$FOLDTRON_GPUS_PER_NODE")
fi
[ -n "$FOLDTRON_TIME" ] && geometry+=("--time=$FOLDTRON_TIME")

# Logs beside the checkpoints, unless an --output was given.
if [[ " ${sbatch_opts[*]} " != *" --output="* ]]; then
  logs=${FOLDTRON_RUN_DIR:-${FOLDTRON_RUN_ROOT:-$PWD/runs}/$name}/logs
  [ "$dry" = 1 ] || mkdir -p "$logs"
  geometry+=("--output=$logs/%x-%j.out")
fi

submit() {
  if [ "$dry" = 1 ]; then
    printf '%q ' sbatch "$@"
    echo
  else
    sbatch --parsable "$@" | cut -d';' -f1
  fi
}

if [ "$requeue" = 1 ]; then
  # One job; pretrain.sbatch requeues it after each requeue exit, while SLURM_RESTART_COUNT < N-1.
  submit --requeue "--export=ALL,FOLDTRON_REQUEUE=1,FOLDTRON_MAX_RESTARTS=$((count - 1))" \
    "${geometry[@]}" "${sbatch_opts[@]}" "$script" "$config" "${overrides[@]}"
else
  for _ in $(seq "$count"); do
    submit --dependency=singleton "${geometry[@]}" "${sbatch_opts[@]}" "$script" "$config" "${overrides[@]}"
  done
fi
