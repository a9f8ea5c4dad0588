"""A throwaway single-node Slurm cluster on localhost, for tests that submit real jobs.

    with SlurmCluster(tmp_dir) as cluster:          # munged + slurmctld + slurmd, node idle
        job = cluster.sbatch(["script.sbatch"], env=...)
        cluster.wait(job)

Everything lives under one temporary directory: a generated munge key and socket, slurm.conf
(free ports, state and spool directories, logs), pid files. No system file is read or written,
so it runs beside a real Slurm installation. Clients find it through ``SLURM_CONF``
(:meth:`env`); jobs inherit that variable, so ``srun`` / ``scontrol`` inside a job do too.

Every daemon is started in its own session and stopped by process group when the cluster is
closed, whatever happened: ``__exit__``, and an ``atexit`` hook as a last resort (a test process
killed by a timeout). Jobs still running are cancelled first, so no ``slurmstepd`` is left behind.

Slurm (``slurm-wlm``) and ``munge`` come from Debian packages; ``.ci/run`` installs them. Without
them :class:`SlurmMissing` is raised, which the tests turn into a failure, not a skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun")
NODE = "localhost"


class SlurmMissing(RuntimeError):
    pass


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def missing_programs() -> List[str]:
    return [name for name in DAEMONS + CLIENTS if _which(name) is None]


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """munged + slurmctld + slurmd for one node named ``localhost`` with this host's CPUs."""

    def __init__(self, root: str, cpus: Optional[int] = None):
        missing = missing_programs()
        if missing:
            raise SlurmMissing(
                f"Slurm is not installed ({' '.join(missing)} not found); these tests need a real "
                "cluster: apt-get install -y slurm-wlm munge (.ci/run does it).")
        if os.geteuid() != 0:
            raise SlurmMissing("the throwaway Slurm cluster runs its daemons as root (SlurmUser=root); "
                               "run the tests as root (CI does).")
        self.root = root
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: Dict[str, subprocess.Popen] = {}
        self.conf = os.path.join(root, "slurm.conf")

    # ------------------------------------------------------------------ start / stop

    def __enter__(self) -> "SlurmCluster":
        atexit.register(self.close)
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _start(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            os.makedirs(self._path(d), mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged checks that its socket directory is reachable
        key = self._path("munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = self._path("munge", "munge.sock")
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={sock}", f"--pid-file={self._path('munge', 'munged.pid')}",
                               f"--seed-file={self._path('munge', 'seed')}",
                               f"--log-file={self._path('log', 'munged.log')}"])
        self._until(lambda: os.path.exists(sock), "munged to create its socket")
        ctld_port, slurmd_port = _free_ports(2)
        with open(self.conf, "w") as f:
            f.write(self._slurm_conf(sock, ctld_port, slurmd_port))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", self.conf])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", NODE, "-f", self.conf])
        self._until(self._node_idle, "the node to be idle in sinfo", timeout=60)

    def _slurm_conf(self, munge_socket: str, ctld_port: int, slurmd_port: int) -> str:
        p = self._path
        return "\n".join([
            "ClusterName=megatronlora", f"SlurmctldHost={NODE}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            f"StateSaveLocation={p('state')}", f"SlurmdSpoolDir={p('spool')}",
            f"SlurmctldPidFile={p('slurmctld.pid')}", f"SlurmdPidFile={p('slurmd.pid')}",
            f"SlurmctldLogFile={p('log', 'slurmctld.log')}", f"SlurmdLogFile={p('log', 'slurmd.log')}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin",
            "JobCompType=jobcomp/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2", "KillWait=10",
            f"NodeName={NODE} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            ""])

    def _spawn(self, name: str, cmd: List[str]) -> None:
        log = open(self._path("log", f"{name}.out"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env(),
                                            start_new_session=True)
        log.close()

    def _until(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip()
        return out == "idle"

    def close(self) -> None:
        """Cancel jobs, then stop every daemon started here (process groups, TERM then KILL)."""
        if not self.procs:
            return
        if all(p.poll() is None for n, p in self.procs.items() if n != "munged"):
            self.run(["scancel", "--full", "--user=root"], check=False)
            deadline = time.time() + 15
            while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        self.procs.clear()
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ clients

    def env(self, extra: Optional[dict] = None) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf, **(extra or {}))

    def run(self, cmd: List[str], check: bool = True, env: Optional[dict] = None, timeout: float = 60):
        proc = subprocess.run([_which(cmd[0]), *cmd[1:]], capture_output=True, text=True,
                              env=self.env(env), timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, args: List[str], env: Optional[dict] = None) -> int:
        """Submit; returns the job id (``sbatch --wait`` is :meth:`run` with ``--wait``)."""
        return int(self.run(["sbatch", "--parsable", *args], env=env).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: int, timeout: float = 300, release_requeued: bool = True) -> Dict[str, str]:
        """Until the job is finished; a requeued job is started at once.

        Slurm holds a requeued job for 120 s (its begin time); the tests have no reason to wait
        that long, so it is released with ``scontrol update StartTime=now``, but only once the node
        is idle again: released while the previous run is still being cleaned up, slurmd refuses
        the new start ("Job credential revoked") and the job fails.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                         "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return info
            if release_requeued and state == "PENDING" and info.get("Reason") == "BeginTime" \
                    and self.run(["sinfo", "-h", "-o", "%T"]).stdout.split() == ["idle"]:
                time.sleep(1.0)  # let slurmd finish forgetting the previous run's credential
                self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = self._path("log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    tail = f.read()[-2000:]
                parts.append(f"--- {name} ---\n{tail}")
        return "\n".join(parts)
