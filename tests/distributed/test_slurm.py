"""scripts/slurm/pretrain_gpt_lora.sbatch on a real (throwaway, single-node) Slurm cluster.

A tiny TP=2 LoRA run on CPU is submitted with sbatch: once through srun + torchrun (the default
launcher), once with one srun task per rank; both must train, log and save the same thing. A
third job gets ``scancel --signal=USR1`` mid-run: its ranks save and exit, the script requeues
the job, the requeued job resumes from the checkpoint, and the losses of the two halves are the
uninterrupted run's, bitwise.
"""

import json
import os
import re
import time

import pytest

from tests import REPO_ROOT
from tests.distributed import script_runs as S
from tests.distributed.slurm_cluster import SlurmCluster, SlurmMissing

# The launch path does not depend on the megatron-core version: run it in one pass of test.sh.
pytestmark = pytest.mark.once

SBATCH = os.path.join(REPO_ROOT, "scripts", "slurm", "pretrain_gpt_lora.sbatch")
ITERS = 30
TRAIN = [*S.TRAIN_FLAGS, "--train-iters", str(ITERS)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        with SlurmCluster(str(tmp_path_factory.mktemp("slurm"))) as c:
            yield c
    except SlurmMissing as err:
        pytest.fail(str(err))  # CI installs Slurm (.ci/run): missing means a broken setup


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm_runs")
    (directory / "model.args").write_text("# the tests' tiny GPT\n" + "\n".join(S.MODEL_FLAGS) + "\n")
    S.make_dataset(str(directory))
    return directory


def job_env(workdir, name, **extra):
    import sys

    return dict(MODEL_ARGS_FILE=str(workdir / "model.args"), DATA_PATH=str(workdir / "corpus"),
                TP="2", NPROC_PER_NODE="2", SAVE=str(workdir / name), TRAIN_ARGS=" ".join(TRAIN),
                LORA_ARGS=" ".join(S.LORA_FLAGS), PYTHON=sys.executable, REPO=REPO_ROOT, **extra)


def submit(cluster, workdir, name, wait=True, **extra):
    log = workdir / f"{name}.out"
    args = ["--output", str(log), "--chdir", REPO_ROOT, SBATCH]
    if wait:
        proc = cluster.run(["sbatch", "--wait", *args], env=job_env(workdir, name, **extra), check=False,
                           timeout=300)
        assert proc.returncode == 0, f"sbatch --wait exited {proc.returncode}\n{log.read_text()}"
        return log.read_text()
    return cluster.sbatch(args, env=job_env(workdir, name, **extra)), log


@pytest.fixture(scope="module")
def uninterrupted(cluster, workdir):
    text = submit(cluster, workdir, "torchrun")
    return S.losses(text), text


def test_sbatch_tiny_tp2_lora_run_logs_and_saves(workdir, uninterrupted):
    losses, text = uninterrupted
    assert sorted(losses) == list(range(1, ITERS + 1)), text
    assert "1 node(s) x 2 rank(s) via torchrun" in text
    assert "world 2 = TP 2 x PP 1 x DP 1 on CPU/gloo" in text
    assert "replicated LoRA factors bitwise identical across TP ranks: 8/8" in text
    save = workdir / "torchrun"
    assert (save / "latest_adapter_iteration.txt").read_text() == str(ITERS)
    assert (save / "adapter.safetensors").exists()
    assert json.loads((save / "metrics.json").read_text())["exit_reason"] is None
    assert "requeueing" not in text


def test_one_srun_task_per_rank_matches_torchrun(cluster, workdir, uninterrupted):
    text = submit(cluster, workdir, "srun", LAUNCHER="srun")
    assert "1 node(s) x 2 rank(s) via srun" in text
    assert S.losses(text) == uninterrupted[0]  # bitwise: the same ranks, launched differently


def test_usr1_preemption_saves_requeues_and_reproduces_losses(cluster, workdir, uninterrupted):
    job, log = submit(cluster, workdir, "preempted", wait=False)
    deadline = time.time() + 180
    while not (log.exists() and re.search(r"^iteration\s+3/", log.read_text(), re.M)):
        assert time.time() < deadline, log.read_text() if log.exists() else "no log"
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.05)
    cluster.run(["scancel", "--signal=USR1", str(job)])  # the job's steps: every rank (and torchrun)
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    stopped = int(re.search(r"exiting at iteration (\d+): SIGUSR1 received", text).group(1))
    assert 3 <= stopped < ITERS, text
    assert f"requeueing job {job}" in text and f"resumed from {workdir / 'preempted'} at iteration {stopped}" in text
    # the log holds both runs (--open-mode=append): the first up to `stopped`, then the rest
    first, second = text.split("(restart 1)")
    assert max(S.losses(first)) == stopped and min(S.losses(second)) == stopped + 1
    assert {**S.losses(first), **S.losses(second)} == uninterrupted[0]  # bitwise
    assert (workdir / "preempted" / "latest_adapter_iteration.txt").read_text() == str(ITERS)


def test_cluster_stops_every_daemon_it_started_even_on_failure(tmp_path):
    """The helper's own contract: an exception inside the block still stops munged / slurmctld /
    slurmd (and a job left running), so a failing test leaves no daemon behind."""
    try:
        with SlurmCluster(str(tmp_path)) as c:
            pids = [p.pid for p in c.procs.values()]
            assert len(pids) == 3
            job = c.sbatch(["--wrap", "sleep 300", "--output", str(tmp_path / "sleep.out")])
            deadline = time.time() + 30
            while not _sleepers():
                assert time.time() < deadline, (c.job(job), c.logs())
                time.sleep(0.1)
            raise KeyboardInterrupt  # what a test failure or Ctrl-C looks like to the block
    except SlurmMissing as err:
        pytest.fail(str(err))
    except KeyboardInterrupt:
        pass
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"daemon {pid} still running"
    assert not _sleepers(), "the job's processes outlived the cluster"


def _sleepers():
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and "sleep 300" in _cmdline(pid)
            and not _zombie(pid)]


def _zombie(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _cmdline(pid) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
