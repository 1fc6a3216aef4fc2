"""A real Slurm cluster on this machine for tests: munged, slurmctld and two slurmd "nodes", all started
from a temporary directory with their own config, ports and munge key (nothing under /etc is touched).

The two nodes, node1 and node2, are two slurmd daemons on this host (`slurmd -N`) with NodeAddr 127.0.0.1:
names that resolve nowhere, so the sbatch script must find the master's address as Slurm does. The packages come
from Debian (`slurm-wlm`, `munge`); `make test` installs them when missing (see the Makefile).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from helpers import Started, free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel")

CONF = """\
ClusterName=pretraintest
SlurmctldHost={ctl}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctl_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={dir}/munge.sock,cred_expire=5
SchedulerParameters=sched_interval=2
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=test Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def missing_reason() -> str | None:
    """Why a real Slurm cannot run here, or None when it can."""
    absent = [name for name in (*DAEMONS, *CLIENTS) if not shutil.which(name)]
    if absent:
        return f"Slurm/munge not installed ({', '.join(absent)} missing; `make test` installs slurm-wlm and munge as root)"
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root"
    return None


class SlurmCluster(Started):
    """Start with `with SlurmCluster() as cluster:`; `env` holds SLURM_CONF for the client commands."""

    def __init__(self) -> None:
        # a short path: the munge socket path must fit in a sockaddr_un
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.nodes = ["node1", "node2"]
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}
        self._procs: list[subprocess.Popen] = []

    def _start(self) -> None:
        d = self.dir
        for sub in ("state", *(f"spool/{n}" for n in self.nodes)):
            (d / sub).mkdir(parents=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d.chmod(0o700)
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={free_port()} "
            f"CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        conf = CONF.format(
            ctl=socket.gethostname().split(".")[0],
            ctl_port=free_port(),
            dir=d,
            nodes=nodes,
            node_list=",".join(self.nodes),
        )
        (d / "slurm.conf").write_text(conf)
        self._spawn(
            ["munged", "-F", "--force", f"--socket={d}/munge.sock", f"--key-file={key}"]
            + [f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"]
        )
        self._wait_for(lambda: (d / "munge.sock").exists(), "munged socket")
        self._spawn(["slurmctld", "-D", "-i"])
        for name in self.nodes:
            self._spawn(["slurmd", "-D", "-N", name])
        self._wait_for(self._nodes_idle, "both slurmd nodes idle")

    def _spawn(self, args: list[str]) -> None:
        with open(self.dir / f"{args[0]}-{len(self._procs)}.stderr", "wb") as log:  # the child keeps its copy
            self._procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait_for(self, check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} exited ({proc.returncode}) before {what}: {self.logs()}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}: {self.logs()}")
            time.sleep(0.5)

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        return out.count("idle") == len(self.nodes)

    def run(self, args: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            args, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        """`sbatch --parsable ARGS` from `cwd`; returns the job id."""
        return self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or {}).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float, until=None) -> dict[str, str]:
        """Poll the job until `until(job)` holds (default: a final state); returns the job's fields."""
        until = until or (lambda job: job["JobState"] in FINAL_STATES)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {job['JobState']} after {timeout:.0f} s: {self.logs()}"
                )
            time.sleep(1)

    def logs(self, tail: int = 2000) -> str:
        text = "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.dir.glob("*.log"))
        )
        return text or "(no daemon logs)"

    def close(self) -> None:
        if len(self._procs) > 1 and self._procs[1].poll() is None:  # slurmctld still answers
            self.run(["scancel", "--full", "--state=RUNNING", "--user=root"], check=False)
            self.run(["scancel", "--user=root"], check=False)
        for proc in reversed(self._procs):
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
