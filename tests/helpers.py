"""Helpers for tests: repository paths and running the real commands (importable as `helpers`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


def run_cmd(
    args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a command with the venv's Python first on PATH; returns the completed process."""
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=command_env(env)
    )


def command_env(env: dict | None = None) -> dict:
    """A test command's environment: this one with `env` on top, Python warnings off, the venv first on PATH."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    return full_env


def torchrun(
    nproc: int, args: list[str], cwd: Path = ROOT, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`args` (a script and its arguments, or `-m module ...`) on `nproc` ranks of one machine, as `torchrun
    --standalone --nproc_per_node nproc args` runs them, each rank forked from a process that has imported torch
    and pretrain once per test worker (tests/forked_ranks.py: ~15 s less per job). The real launcher is tested
    where it is what is under test (test_launch, test_preemption, test_slurm)."""
    import forked_ranks

    return forked_ranks.run(nproc, args, cwd, command_env(env), timeout)


def train_runs(
    steps: list[dict], nproc: int = 2, timeout: int = 1200, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Do `steps` (training runs of configs/tiny.yaml and file steps between them, see
    tests/pretrain/runs_worker.py) in order in one job of `nproc` ranks (`torchrun`): one start-up for all of
    them. Asserts that every step succeeded, with the end of stderr otherwise; returns the job."""
    worker = ROOT / "tests" / "pretrain" / "runs_worker.py"
    proc = torchrun(nproc, [str(worker), json.dumps(steps)], timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]  # torchrun's own report of a failure takes ~2000
    return proc


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of the finished run `src` at `dst` as if it had died right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    for folder in (dst / "checkpoints").glob("step_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    (dst / "checkpoints/latest").write_text(f"step_{step:08d}")
    return dst


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_image_folder(folder: Path, count: int, size: int = 24, corrupt: bool = True) -> list[str]:
    """Images ``img000.png``… of varied sizes, each with a same-name ``.txt`` caption of i+1 words.

    With ``corrupt``, also ``broken.jpg`` (not an image) with a caption. Returns the image names.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        pixels = rng.integers(0, 255, (size + i, size + 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(" ".join(["word"] * (i + 1)))
        names.append(f"img{i:03d}.png")
    if corrupt:
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
        (folder / "broken.txt").write_text("a broken image")
        names.append("broken.jpg")
    return names


def _file_handler(files: dict[str, bytes], delay: float) -> type:
    """A request handler serving ``files`` (name -> bytes) after ``delay`` seconds; 404 for others."""
    import http.server
    import time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            time.sleep(delay)
            data = files.get(self.path.lstrip("/"))
            self.send_response(200 if data is not None else 404)
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    return Handler


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_files(files: dict[str, bytes], delay: float = 0.0) -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 (free port) in a thread; yields its base URL."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _file_handler(files, delay))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def train_in_process(tmp: Path, overrides: list[str], name: str = "tiny", until: int | None = None) -> Path:
    """Train configs/tiny.yaml with `overrides` in this process (metrics every step); returns the run dir.

    `until` stops after that step with a checkpoint, as an interruption would.
    """
    from pretrain.config import load_config
    from pretrain.training.trainer import Trainer

    cfg = load_config(TINY, [f"run.dir={tmp}", f"run.name={name}", "log.every=1", *overrides])
    trainer = Trainer(cfg)
    try:
        trainer.train(until=until)
    finally:
        trainer.close()
    return cfg.run_dir


def trained_tiny_clip(root: Path, shards: str, steps: int = 80, batch_size: int = 32) -> Path:
    """A tiny-clip run trained on ``shards`` in ``root`` (configs/tiny.yaml); reused when already there.

    80 steps of 32 demo samples separate matched from mismatched captions clearly.
    """
    return trained_tiny_model(root, "tiny-clip", shards, steps, batch_size)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a busy machine several times faster than threads competing for cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def moto_s3(monkeypatch, bucket: str = "bucket") -> Iterator:
    """A moto S3 server on loopback holding an empty `bucket`; the project finds it through AWS_ENDPOINT_URL
    (set with the test credentials by `monkeypatch`). Yields a boto3 client of it.

    moto keeps its buckets in module globals, which every server of a process shares: an earlier test's
    objects (in this pytest process or xdist worker) would still be there, so the server starts reset."""
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=bucket)
    try:
        yield client
    finally:
        server.stop()


def trained_tiny_model(root: Path, model: str, shards: str, steps: int = 80, batch_size: int = 32) -> Path:
    """A run of `model` (configs/tiny.yaml) trained on ``shards`` in ``root``; reused when already there.

    One torch thread: ~15 s for tiny-clip on 2 idle cores, and on a busy machine several times faster than
    spinning threads competing for cores.
    """
    run_dir = root / f"{model}-run"
    if (run_dir / "checkpoints" / "latest").exists():
        return run_dir
    overrides = [f"model.name={model}", f"data.train={shards}", f"train.steps={steps}"]
    overrides += [f"train.batch_size={batch_size}", "train.warmup_steps=10", f"checkpoint.every={steps}"]
    overrides += [f"log.every={steps}"]
    with one_torch_thread():
        return train_in_process(root, overrides, name=run_dir.name)


def write_export(folder: Path) -> Path:
    """A tiny-clip (seeded random weights) as an open_clip export folder, built by open_clip alone."""
    import open_clip
    import torch

    open_clip.add_model_config(ROOT / "configs" / "models")
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("tiny-clip")
    model_cfg = json.loads((ROOT / "configs/models/tiny-clip.json").read_text())
    return write_open_clip_folder(folder, model, model_cfg)


def features(output):
    """transformers' `get_*_features` embedding: a tensor before transformers 5, the output's `pooler_output`
    since."""
    return getattr(output, "pooler_output", output)


def assert_same_direction(theirs, ours, min_cosine: float = 0.9999) -> None:
    """Row by row, `theirs` (another library's embeddings) points where `ours` does: cosine >= `min_cosine`."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(theirs, ours, dim=-1)
    assert theirs.shape == ours.shape and cosine.min() >= min_cosine, cosine.min()


def write_open_clip_folder(folder: Path, model, model_cfg: dict) -> Path:
    """`model` as an open_clip export folder (its config with the 64 px OpenAI preprocessing, its weights as
    safetensors), written with open_clip and safetensors only."""
    import open_clip
    from safetensors.torch import save_model

    mean, std = list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": 64, "mean": mean, "std": std}}
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_model(model, str(folder / "open_clip_model.safetensors"))
    return folder


class Started:
    """A context manager for test clusters: ``_start()`` on entry, ``close()`` on exit, and ``close()``
    also when starting fails part way, so no daemon outlives a failed start."""

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Put back what starting `pretrain train` in this process changes before it refuses: the preemption
    signal handlers (`catch_early`) and the signals it caught, logging handlers and levels, RNG seeds, torch
    threads. Later tests then run as in a fresh process."""
    import logging
    import random
    import signal

    import numpy as np
    import torch

    from pretrain.training import preemption

    handlers = {sig: signal.getsignal(sig) for sig in (*preemption.SIGNALS, signal.SIGINT)}
    root, project = logging.getLogger(), logging.getLogger("pretrain")
    logs = (list(root.handlers), root.level, project.level)
    rngs = (random.getstate(), np.random.get_state(), torch.random.get_rng_state(), torch.get_num_threads())
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        preemption._early.clear()
        root.handlers[:] = logs[0]
        root.setLevel(logs[1])
        project.setLevel(logs[2])
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.random.set_rng_state(rngs[2])
        torch.set_num_threads(rngs[3])


def _cli_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """`pretrain ARGV` (`pretrain.cli.main`) in this process, its state put back after: (exit status, stdout,
    stderr). The same as a subprocess without ~5-10 s of importing torch and open_clip per call."""
    from pretrain.cli import main

    capsys.readouterr()  # drop what the test printed before
    with process_state_kept():
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def cli_output(argv: list[str], capsys) -> str:
    """`pretrain ARGV` in this process; asserts exit 0 (with the end of stderr otherwise), returns stdout."""
    status, out, err = _cli_in_process(argv, capsys)
    assert status == 0, err[-3000:]
    return out


def refused(argv: list[str], capsys, not_made: Path | None = None, code: int = 2) -> str:
    """`pretrain ARGV` in this process, where only its refusal is under test: asserts exit status `code`
    (returned, or argparse's SystemExit), exactly one line on stderr, nothing on stdout, and that `not_made`
    (the run or output folder) was not created; returns that line."""
    status, out, err = _cli_in_process(argv, capsys)
    lines = err.strip().splitlines()
    assert status == code and len(lines) == 1 and out == "", (status, out, err)
    assert not_made is None or not not_made.exists(), f"{not_made} was made"  # nothing half-written
    return lines[0]


def selected(request, marker: str) -> bool:
    """Whether this session runs a test of the requesting module marked `marker`: a module-scoped fixture
    computes what only `slow` tests read just when one of them runs (`make test-fast` deselects them)."""
    return any(
        item.path == request.path and item.get_closest_marker(marker) for item in request.session.items
    )


def lineage_identity(data: bytes) -> dict:
    """What two runs of one stage on the same data agree on in its lineage file (tests/data_tools/
    test_lineage.py tests the rest): the stage's id (a digest of its name, settings and the fingerprints of
    what it read and wrote), its counts, and its ancestors' ids; not when, where, or on which engine."""
    doc = json.loads(data)
    return {"id": doc["stage"]["id"], "counts": doc["stage"]["counts"], "ancestors": sorted(doc["ancestors"])}


def shards_fingerprint(folder: Path) -> str:
    """The shards fingerprint by its documented method (webshards/fingerprints.py), computed from the files:
    sha256 over one `NAME<TAB>TAR BYTES<TAB>SAMPLES` line per shard of the folder, samples from sizes.json."""
    import hashlib

    sizes = json.loads((folder / "sizes.json").read_text())
    lines = "".join(f"{name}\t{(folder / name).stat().st_size}\t{sizes[name]}\n" for name in sorted(sizes))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def private_packages(requirements: Path, name: str) -> Path:
    """A folder holding the packages of ``requirements`` (installed with --no-deps, never into the project's
    environment), put first on a reference subprocess's PYTHONPATH; installed on first use, kept in the
    user's cache keyed by the file's digest. CI reaches the registry, so there a failed install fails the
    test; elsewhere it skips it."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip-pretrain-tests"
    target = cache / f"{name}-{digest}"
    if target.is_dir():
        return target
    tmp = cache / f".{target.name}.{os.getpid()}.tmp"
    # --no-compile: pip compiles one file at a time (transformers: 15 s instead of 3); the references import few
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-compile",
        "--no-deps",
        "--target",
        str(tmp),
    ]
    proc = subprocess.run([*cmd, "-r", str(requirements)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        reason = f"cannot install {requirements.name}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    os.replace(tmp, target)
    return target


def adapt_output_cut_at(unbroken: Path, cut: Path, step: int, last: int) -> Path:
    """A copy of a finished `pretrain adapt` output folder as it stood after its checkpoint of `step`: the
    checkpoint of the `last` step, the results and the model left out, `latest` naming `step`'s."""
    shutil.copytree(unbroken, cut, ignore=shutil.ignore_patterns("model", "results.*", f"step_{last:08d}.pt"))
    (cut / "checkpoints" / "latest").write_text(f"step_{step:08d}.pt")
    return cut


class LoaderRanks:
    """Every rank's stream loader of one topology, in this process: the global batches they read together."""

    def __init__(self, loaders: list, state: list | None = None) -> None:
        self.loaders = loaders
        for source in loaders if state is not None else ():
            source.load_state_dict(state)

    def state(self) -> list[dict]:
        """What a checkpoint gathers: every rank's state, in rank order."""
        return [source.state_dict() for source in self.loaders]

    def close(self) -> None:
        for source in self.loaders:
            source.close()
