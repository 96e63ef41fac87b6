#!/usr/bin/env bash
# Trains jfacerec on a Cloud TPU VM or pod slice with gcloud: create the TPU, install jfacerec[tpu]
# on every worker, run jfacerec.train on all workers at once, delete the TPU. See --help, and
# launch/README.md for how the workers cooperate.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options]
                        [--config.KEY=VALUE ...] [-- ARG ...]

Commands:
  create    create the TPU VM or pod slice (needs --accelerator-type)
  install   put the code on every worker and install jfacerec[tpu] into ~/jfacerec-venv
  train     run python -m jfacerec.train on every worker (needs --config, --workdir)
  delete    delete the TPU
  all       create, install, train (and delete, with --delete)

Options:
  --name NAME               TPU name (required)
  --zone ZONE               zone, e.g. us-central2-b (required)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE   e.g. v4-32, v5litepod-8, v5p-8, v6e-8 (create, all)
  --version RUNTIME         TPU software version (default from TYPE: tpu-ubuntu2204-base for
                            v2-v4, v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p,
                            v2-alpha-tpuv6e for v6e)
  --spot                    create a spot TPU (cheaper, may be preempted at any time)
  --preemptible             create a preemptible TPU (the older kind: also ends within 24 hours)
  --repo URL                install: fetch the code on each worker with git from URL
                            (default: copy this checkout's tracked and untracked, not ignored files)
  --ref REF                 branch, tag or commit to fetch from --repo (default: its HEAD)
  --config FILE             training config, relative to the repository root (train, all)
  --workdir DIR             checkpoints and logs, gs://BUCKET/PATH on a multi-host slice
                            (train, all)
  --log FILE                local file the workers' output is appended to (default: NAME.log)
  --delete                  with train or all: delete the TPU when the script ends, however it ends
  --dry-run                 print the commands, one per line as shell, without running any
  -h, --help                this help

--config.KEY=VALUE arguments, and every argument after --, go to jfacerec.train unchanged.

Example:
  launch/tpu_vm.sh all --name r50 --zone us-central2-b --accelerator-type v4-32 \
      --config configs/tpu_v4_32.py --workdir gs://my-bucket/r50 --config.total_steps=20000 --delete
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  echo "Run launch/tpu_vm.sh --help for usage." >&2
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

# Every command goes through one line of shell: printed in a dry run, traced and run otherwise, so
# what a dry run shows is exactly what a real run executes.
run_line() {
  if ((dry_run)); then
    echo "$1"
  else
    echo "+ $1" >&2
    eval "$1"
  fi
}

run() {
  run_line "$(quote "$@")"
}

# The arguments joined with " && ": one remote command that stops at the first failing step.
join_and() {
  local joined=$1 step
  shift
  for step in "$@"; do
    joined+=" && $step"
  done
  echo "$joined"
}

# The TPU software version that Google advises for JAX on each TPU generation.
set_default_version() {
  case $accelerator_type in
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type '$accelerator_type'" \
      "(v5e slices are named v5litepod-N); give --version" ;;
  esac
}

create_tpu() {
  local create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_where[@]}"
    --accelerator-type="$accelerator_type" --version="$version")
  ((!spot)) || create+=(--spot)
  ((!preemptible)) || create+=(--preemptible)
  run "${create[@]}"
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_where[@]}" --worker=all --command "$1"
}

# The code lands in ~/jfacerec on every worker and is updated in place, so that a relative --workdir
# (under ~/jfacerec) survives a reinstall. The TPU images' Python is 3.10 and jfacerec needs 3.11:
# uv brings its own interpreter into ~/jfacerec-venv.
# shellcheck disable=SC2088 # the steps run on the workers, where their ~ expands
install_jfacerec() {
  local steps tarball list
  if [[ -n $repo ]]; then
    steps=("git init -q ~/jfacerec"
      "git -C ~/jfacerec fetch -q --depth=1 $(quote "$repo" "$ref")"
      "git -C ~/jfacerec checkout -q --force FETCH_HEAD")
  else
    tarball="${TMPDIR:-/tmp}/jfacerec-$name.tar.gz"
    list="git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard"
    run_line "$list | tar -C $(quote "$REPO") --null -T - -czf $(quote "$tarball")"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:jfacerec.tar.gz" "${gcloud_where[@]}" \
      --worker=all
    steps=("mkdir -p ~/jfacerec" "tar -xzf jfacerec.tar.gz -C ~/jfacerec" "rm jfacerec.tar.gz")
  fi
  steps+=("{ test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
    "rm -rf ~/jfacerec-venv"
    "~/.local/bin/uv venv -q --python 3.11 ~/jfacerec-venv"
    "~/.local/bin/uv pip install -q --python ~/jfacerec-venv/bin/python -e \"\$HOME/jfacerec[tpu]\"")
  on_all_workers "$(join_and "${steps[@]}")"
}

# Every worker runs the same command; JAX on a TPU slice finds its peers by itself. The output of
# all workers streams here and into the log. (${a[@]+"${a[@]}"} is an array that may be empty:
# bash before 4.4, as on macOS, rejects a plain empty "${a[@]}" under set -u.)
train() {
  local remote ssh
  remote="cd ~/jfacerec && ~/jfacerec-venv/bin/python -m jfacerec.train"
  remote+=" $(quote --config "$config" --workdir "$workdir" ${train_args[@]+"${train_args[@]}"})"
  ssh=$(quote gcloud compute tpus tpu-vm ssh "$name" "${gcloud_where[@]}" --worker=all \
    --command "$remote")
  run_line "$ssh 2>&1 | tee -a $(quote "$log")"
}

delete_tpu() {
  run gcloud compute tpus tpu-vm delete "$name" "${gcloud_where[@]}" --quiet
}

delete_when_done() {
  trap delete_tpu EXIT
  trap 'exit 130' INT TERM # so that Ctrl-C also reaches the EXIT trap
}

command="" name="" zone="" project="" accelerator_type="" version="" repo="" ref=HEAD
config="" workdir="" log="" spot=0 preemptible=0 delete=0 dry_run=0 train_args=()
while (($#)); do
  case $1 in
    --config.*) train_args+=("$1"); shift; continue ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
  esac
  case $1 in
    --name | --zone | --project | --accelerator-type | --version | --repo | --ref | --config | \
      --workdir | --log)
      (($# >= 2)) && [[ $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) version=$2 ;;
        --repo) repo=$2 ;;
        --ref) ref=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --log) log=$2 ;;
      esac
      shift 2 ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    create | install | train | delete | all)
      [[ -z $command ]] || die "one command at a time (got $command and $1)"
      command=$1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n $command ]] || die "missing command: create, install, train, delete or all"
[[ -n $name ]] || die "missing --name"
[[ -n $zone ]] || die "missing --zone"
if [[ $command == create || $command == all ]]; then
  [[ -n $accelerator_type ]] || die "missing --accelerator-type (e.g. v4-32, v5litepod-8)"
  [[ -n $version ]] || set_default_version
  ((spot + preemptible < 2)) || die "--spot and --preemptible exclude each other"
fi
if [[ $command == train || $command == all ]]; then
  [[ -n $config ]] || die "missing --config"
  [[ -n $workdir ]] || die "missing --workdir"
  if [[ $workdir != gs://* ]]; then
    echo "tpu_vm.sh: warning: on a multi-host slice --workdir $workdir must be a folder" \
      "every worker shares; a gs://BUCKET/PATH workdir is written directly" >&2
  fi
else
  ((!delete)) || die "--delete goes with train or all (or use the delete command)"
fi
gcloud_where=(--zone="$zone")
[[ -z $project ]] || gcloud_where+=(--project="$project")
log=${log:-$name.log}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

case $command in
  create) create_tpu ;;
  install) install_jfacerec ;;
  train)
    ((!delete)) || delete_when_done
    train ;;
  delete) delete_tpu ;;
  all)
    create_tpu
    ((!delete)) || delete_when_done
    install_jfacerec
    train ;;
esac
