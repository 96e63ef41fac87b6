#!/usr/bin/env bash
# Trains jfacerec on GPUs of one or more SLURM nodes: one process per GPU, all joined through
# jax.distributed, whose coordinator and process numbers come from SLURM's environment.
#
# One script, three roles, chosen by where it runs:
#   - outside a job, it submits itself with sbatch (its options override the #SBATCH lines below);
#   - inside a job (the batch step, or a shell from salloc), it starts one task per GPU with srun;
#   - as such a task (--task), it exports JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
#     JAX_PROCESS_ID and CUDA_VISIBLE_DEVICES, then runs python -m jfacerec.train.
# See --help, and launch/README.md.
#
#SBATCH --job-name=jfacerec
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --config FILE --workdir DIR [options]
                           [--config.KEY=VALUE ...] [-- ARG ...]
       sbatch [SBATCH OPTIONS] launch/gpu_slurm.sh --config FILE --workdir DIR [...]

Outside a SLURM job the script submits itself with sbatch; inside one (sbatch, salloc) it runs
one srun task per GPU of the allocation.

Training (passed to every task):
  --config FILE           training config, relative to the submission directory (required)
  --workdir DIR           checkpoints and logs, on a filesystem every node shares (required)
  --python PYTHON         interpreter that has jfacerec installed (default: python on PATH)
  --port PORT             coordinator port on the first node (default: 10000 + job id % 20000)

Submission (override the script's #SBATCH lines; only outside a job):
  --nodes N               nodes (default 2)
  --gpus-per-node G       GPUs per node, and as many tasks per node (default 8)
  --cpus-per-task C       CPU cores per task, for the input pipeline (default 8)
  --partition P           partition (default: the cluster's)
  --time T                time limit, e.g. 12:00:00 (default 24:00:00)
  --account A             account to charge (default: yours)
  --job-name NAME         job name, also names the log NAME-JOBID.out (default jfacerec)

Other:
  --task                  run as one srun task (what srun runs; with --dry-run, shows its setup)
  --dry-run               print the commands, one per line as shell, without running any
  -h, --help              this help

--config.KEY=VALUE arguments, and every argument after --, go to jfacerec.train unchanged.

Example:
  launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 \
      --config configs/hw2p2_iresnet50.py --workdir /shared/$USER/r50 --config.total_steps=20000
EOF
}

die() {
  echo "gpu_slurm.sh: error: $*" >&2
  echo "Run launch/gpu_slurm.sh --help for usage." >&2
  exit 2
}

# Shell words that need no quoting pass through; every other argument is single-quoted, so that
# a printed line runs as the same argv when pasted into a shell.
quote() {
  local arg words=() sq="'" escaped="'\\''"
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//$sq/$escaped}'")
    fi
  done
  echo "${words[*]}"
}

# Printed in a dry run, traced and run otherwise, from the same line of shell: what a dry run
# shows is exactly what a real run executes.
run() {
  local line
  line=$(quote "$@")
  if ((dry_run)); then
    echo "$line"
  else
    echo "+ $line" >&2
    eval "$line"
  fi
}

# ${a[@]+"${a[@]}"} is an array that may be empty: bash before 4.4 rejects a plain empty "${a[@]}"
# under set -u.
submit() {
  run sbatch ${sbatch_opts[@]+"${sbatch_opts[@]}"} "$0" "${forward[@]}"
}

# sbatch runs a private copy of this script that exists on the first node only: sbcast puts it on
# every node of the job for the tasks. --kill-on-bad-exit: a process that dies would otherwise leave
# the others waiting in a collective until the time limit.
launch_tasks() {
  local copy="/tmp/jfacerec-gpu_slurm-$SLURM_JOB_ID.sh" srun_opts=(--kill-on-bad-exit=1)
  # srun stopped inheriting the job's --cpus-per-task in Slurm 22.05.
  [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  run sbcast --force "$0" "$copy"
  run srun "${srun_opts[@]}" bash "$copy" --task "${forward[@]}"
}

# The GPU of this task. Slurm lists the node's GPUs that the job holds in CUDA_VISIBLE_DEVICES:
# the task keeps the one at its local rank (or the only one, when Slurm bound a GPU per task).
task_gpu() {
  local gpus
  IFS=, read -ra gpus <<<"${CUDA_VISIBLE_DEVICES:-}"
  case ${#gpus[@]} in
    0) echo "$SLURM_LOCALID" ;;
    1) echo "${gpus[0]}" ;;
    *)
      ((SLURM_LOCALID < ${#gpus[@]})) ||
        die "task $SLURM_LOCALID of its node has no GPU of its own" \
          "(CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)"
      echo "${gpus[SLURM_LOCALID]}" ;;
  esac
}

# Task 0 runs on the first node of the job and hosts jax.distributed's coordinator there. The
# default port depends on the job so that jobs sharing a node do not collide.
run_task() {
  local name hosts gpu
  for name in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
    [[ -n ${!name:-} ]] || die "--task runs under srun, but $name is not set"
  done
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
  gpu=$(task_gpu)
  run export JAX_COORDINATOR_ADDRESS="${hosts%%$'\n'*}:${port:-$((10000 + SLURM_JOB_ID % 20000))}"
  run export JAX_NUM_PROCESSES="$SLURM_NTASKS"
  run export JAX_PROCESS_ID="$SLURM_PROCID"
  run export CUDA_VISIBLE_DEVICES="$gpu"
  run "$python" -m jfacerec.train --config "$config" --workdir "$workdir" \
    ${train_args[@]+"${train_args[@]}"}
}

positive() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 needs a positive whole number, not '$2'"
}

# forward: what the tasks need, as given; sbatch_opts: what only a submission uses.
config="" workdir="" python=python port="" task=0 dry_run=0
train_args=() forward=() sbatch_opts=()
while (($#)); do
  case $1 in
    --config.*) train_args+=("$1"); forward+=("$1"); shift; continue ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case $1 in
    --config | --workdir | --python | --port | --nodes | --gpus-per-node | --cpus-per-task | \
      --partition | --time | --account | --job-name)
      (($# >= 2)) && [[ $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --config) config=$2; forward+=("$1" "$2") ;;
        --workdir) workdir=$2; forward+=("$1" "$2") ;;
        --python) python=$2; forward+=("$1" "$2") ;;
        --port) positive "$1" "$2"; port=$2; forward+=("$1" "$2") ;;
        --gpus-per-node)
          positive "$1" "$2"
          sbatch_opts+=(--ntasks-per-node="$2" --gpus-per-node="$2") ;;
        --nodes | --cpus-per-task) positive "$1" "$2"; sbatch_opts+=("$1=$2") ;;
        *) sbatch_opts+=("$1=$2") ;;
      esac
      shift 2 ;;
    --task) task=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args+=("$@"); forward+=(-- "$@"); break ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n $config ]] || die "missing --config"
[[ -n $workdir ]] || die "missing --workdir"
if ((task)) || [[ -n ${SLURM_JOB_ID:-} ]]; then
  ((${#sbatch_opts[@]} == 0)) ||
    die "${sbatch_opts[0]%%=*} and the other submission options only apply outside a job;" \
      "inside job ${SLURM_JOB_ID:-?} the allocation decides (give them to sbatch instead)"
fi

if ((task)); then
  run_task
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
  launch_tasks
else
  submit
fi
