"""A real two-node Ray cluster on this machine for tests, inside a private network namespace.

`unshare -n` makes a network namespace with only a loopback device (brought up here); a head node
(`ray start --head --block`) and a worker node (`ray start --address … --block`), each with 1 CPU and its
own temp dir, run inside it, and so do the jobs (`nsenter -t PID -n data-tools … --engine ray`). Ray maps
127.0.0.1 to the machine's interface address outside a namespace; inside this one the only interface is
lo, so every node registers as 127.0.0.1 (`nodes()` checks it) and, with `RAY_USAGE_STATS_ENABLED=0`, no
traffic goes anywhere but loopback. Stopping ends the two `ray start` processes (they stop their raylets,
GCS and workers), then the namespace's holder process; `leftovers()` lists anything still running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from helpers import ROOT, Started

HEAD_PORT = 6379  # the namespace is private: every port in it is free
BIN = Path(sys.executable).parent


def missing_reason() -> str | None:
    """Why the test cluster cannot run here, or None when it can."""
    try:
        import ray  # noqa: F401
    except ImportError as error:
        return f"ray is not importable ({error}); pip install clip-pretrain[ray]"
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return "unshare/nsenter (util-linux) not installed"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n not permitted here: {probe.stderr.strip()}"
    return None


class RayCluster(Started):
    """Start with `with RayCluster() as cluster:`; `cluster.run([...])` runs a command inside its namespace."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths live under it
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONWARNINGS": "ignore"}
        # Ray >= 2.5x turns token auth on for `ray start --head` whenever ~/.ray/auth_token exists (an
        # earlier ray.init() on the machine writes one) but not for a joining `ray start --address`, which
        # is then refused. Nothing outside the private namespace can reach this cluster: no auth.
        self.env["RAY_AUTH_MODE"] = "disabled"
        # the nodes' workers import the task functions: this checkout, whatever is installed
        self.env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        self.env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        # the nodes' S3 credentials (a real cluster's come from its environment or instance roles); the
        # endpoint (a moto server in the namespace) is set by the job's driver, which forwards it
        self.env |= {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self._holder: subprocess.Popen | None = None
        self._nodes: list[subprocess.Popen] = []
        self._background: list[subprocess.Popen] = []

    def _start(self) -> None:
        # unshare -n execs sleep in the new namespace, so the holder's pid names it
        self._holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        self._wait_for(lambda: _netns(self._holder.pid) != _netns(os.getpid()), "the network namespace")
        subprocess.run(self._enter(["ip", "link", "set", "lo", "up"]), check=True)
        self._spawn_node("head", ["--head", "--port", str(HEAD_PORT), "--include-dashboard=false"])
        self.add_worker()

    def add_worker(self, expected: int = 2) -> None:
        """Start one more worker node (a fresh temp dir); wait until ``expected`` nodes are alive."""
        self._spawn_node(f"worker{len(self._nodes)}", ["--address", self.address])
        self._wait_for(lambda: self.alive_nodes() == expected, f"{expected} alive Ray nodes", 180)

    def _spawn_node(self, name: str, args: list[str]) -> None:
        temp = self.dir / name
        options = [
            "--block",
            "--num-cpus",
            "1",
            "--temp-dir",
            str(temp),
            "--object-store-memory",
            "100000000",
        ]
        with open(self.dir / f"{name}.log", "wb") as log:  # the child keeps its copy
            command = self._enter([str(BIN / "ray"), "start", *args, *options])
            self._nodes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _enter(self, command: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self._holder.pid), "-n", *command]

    def run(
        self, args: list[str], timeout: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (the venv's scripts first on PATH)."""
        return subprocess.run(
            self._enter(args),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, args: list[str], env: dict | None = None, stdout=subprocess.PIPE) -> subprocess.Popen:
        """Start a background command inside the namespace; ended by ``close`` at the latest."""
        proc = subprocess.Popen(self._enter(args), env={**self.env, **(env or {})}, stdout=stdout, text=True)
        self._background.append(proc)
        return proc

    def nodes(self) -> list[dict]:
        """Each node Ray knows: ``{"alive": bool, "address": NodeManagerAddress}``."""
        script = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{'alive': n['Alive'], 'address': n['NodeManagerAddress']} for n in ray.nodes()]))"
        )
        proc = self.run([sys.executable, "-c", script % self.address], timeout=120)
        if proc.returncode != 0:
            return []
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> int:
        return sum(node["alive"] for node in self.nodes())

    def raylet_pids(self) -> dict[str, int]:
        """Node name (``head``, ``worker1``, …) -> pid of its raylet, from the temp dir on its command line."""
        pids = {}
        for pid, cmdline in _processes():
            if cmdline and cmdline[0].endswith("raylet"):
                for name in ("head", *(f"worker{i}" for i in range(1, len(self._nodes)))):
                    if any(str(self.dir / name) in part for part in cmdline):
                        pids[name] = pid
        return pids

    def running_task_workers(self, raylet: int) -> list[int]:
        """Pids of the worker processes of ``raylet`` that are running a task now (title ``ray::NAME``)."""
        return [
            pid
            for pid, cmdline in _processes()
            if cmdline
            and cmdline[0].startswith("ray::")
            and cmdline[0] != "ray::IDLE"
            and _parent(pid) == raylet
        ]

    def leftovers(self) -> list[str]:
        """Command lines of processes still running that belong to this cluster."""
        return [" ".join(c)[:200] for _, c in _processes() if any(str(self.dir) in part for part in c)]

    def _wait_for(self, check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self._holder.poll() is not None or any(node.poll() is not None for node in self._nodes[:1]):
                raise RuntimeError(f"the Ray cluster stopped before {what}: {self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}: {self.logs()}")
            time.sleep(1)

    def logs(self, tail: int = 3000) -> str:
        return "".join(
            f"\n--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(self.dir.glob("*.log"))
        )

    def close(self) -> None:
        """End the `ray start` processes (workers first), then the namespace holder; kill what remains."""
        for proc in self._background:
            proc.kill()
            proc.wait()
        for node in reversed(self._nodes):
            if node.poll() is None:
                node.terminate()
        for node in reversed(self._nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for pid, cmdline in _processes():  # a raylet or worker a killed node left behind
            if any(str(self.dir) in part for part in cmdline):
                os.kill(pid, signal.SIGKILL)
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _netns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def _processes() -> list[tuple[int, list[str]]]:
    """(pid, command line) of every process readable under /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            found.append(
                (int(entry.name), [part.decode(errors="replace") for part in raw.split(b"\0") if part])
            )
    return found
