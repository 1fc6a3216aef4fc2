"""The main-process side of the WebDataset pipeline: a DataLoader over `ShardStream`, its resume state,
and the device-side finishing of images (resize/crop/normalise on the GPU, optional nvJPEG decoding).

The DataLoader takes batches from its workers round-robin, so batch `k` comes from worker `k % workers`.
The source records the `Position` each consumed batch carries; a checkpoint stores those and the number of
batches consumed. On resume, worker `j` takes the role of worker `(j + consumed) % workers`, so the next
batch comes from the same worker, at the same position, as it would have without the interruption.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import signal
import weakref
from collections import Counter
from dataclasses import asdict

import torch
from torch.utils.data import DataLoader

from pretrain.data import decode as dec
from pretrain.data.plan import ShardPlan
from pretrain.data.stream import DataError, Position, ShardStream, StreamConfig
from pretrain.data.transform import TensorTransform, split_transform
from webshards.spec import parse_spec

log = logging.getLogger("pretrain")

DECODERS = ("cpu", "device", "nvjpeg")


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images)


def _as_list(images: list[torch.Tensor]) -> list[torch.Tensor]:
    return images


def _labels(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(t) for t in texts])


def _captions(texts: list[str]) -> list[list[str]]:
    """Each sample's captions: clip_benchmark splits a retrieval sample's `txt` into lines."""
    return [t.splitlines() for t in texts]


TARGETS = {"labels": _labels, "captions": _captions}
"""Eval-time text targets: `cls` class indices, or raw captions (tokenised later by the evaluator)."""


def _normalize_on(normalize, device: torch.device, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """The `cpu` path's finish: the workers already cropped (the seeds are not needed), normalise here."""
    return normalize(images.to(device, non_blocking=True))


def _ignore_stop_signals(worker_id: int) -> None:
    """A data worker leaves Ctrl-C, SIGTERM and SIGUSR1 to the trainer, which stops after the step with a
    checkpoint: a terminal's Ctrl-C and a group-wide kill reach the workers too, and would otherwise run the
    trainer's handler they inherited (a second log line) or kill them (the next batch fails). Workers end
    when the loader shuts them down, or when the trainer is gone (torch's worker watchdog)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


_RUNNING: weakref.WeakSet = weakref.WeakSet()
"""Loaders whose workers are running: closed at the interpreter's exit if nobody closed them."""


@atexit.register
def _close_running_loaders() -> None:
    """Shut down the workers of every loader still running when the interpreter exits (a loader left open by an
    error, or by a script that ends without closing it). The workers ignore SIGTERM, which is how
    multiprocessing's own exit ends daemon processes before it waits for them: without this the exit waits
    forever. Registered after multiprocessing's exit handler (torch imports it first), so it runs before it."""
    for loader in list(_RUNNING):
        loader.close()


class DeviceFinish:
    """The model's transform on the device: decode JPEGs there first when given encoded bytes (nvJPEG
    through torchvision on CUDA), then its resize/crop steps, each image's random crop replayed from the
    seed the worker drew it with (the crops the `cpu` path would take), then normalise the batch."""

    def __init__(self, transform: TensorTransform, device: torch.device, encoded: bool) -> None:
        self.transform, self.device, self.encoded = transform, device, encoded

    def __call__(self, images: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
        if self.encoded:
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device)
        generator = torch.default_generator
        state = generator.get_state()  # the main process's own random stream is left as it was
        try:
            out = []
            for image, seed in zip(images, seeds, strict=True):
                generator.manual_seed(seed)
                out.append(self.transform.apply(image.to(self.device, non_blocking=True)))
        finally:
            generator.set_state(state)
        return self.transform.normalize(torch.stack(out))


class StreamLoader:
    """One rank's batches from a `ShardStream` through a DataLoader, with each worker's `Position` kept for
    exact resume. Training streams never end: an error from the stream, or its end, is a `DataError`."""

    def __init__(self, stream_cfg: StreamConfig, decode, collate, tokenize, pin_memory: bool = False) -> None:
        self.stream_cfg, self.decode, self.collate, self.tokenize = stream_cfg, decode, collate, tokenize
        self.workers, self.world = stream_cfg.data.workers, stream_cfg.world
        self.pin_memory, self.prefetch = pin_memory, stream_cfg.data.prefetch
        self.positions: dict[int, Position] = {}
        self.micro_batches = 0
        self._shard_of: dict[int, int] = {}  # per worker role: the shard number its latest batch ended in
        self._retries_of: dict[int, int] = {}  # per worker role: storage retries of its stream so far
        self._retries_before = 0  # of workers shut down earlier
        self._iter = None

    def _start(self) -> None:
        slots = max(1, self.workers)
        dataset = ShardStream(
            self.stream_cfg,
            self.decode,
            self.collate,
            self.tokenize,
            dict(self.positions),
            self.micro_batches % slots,
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals,
            # its workers' base seed from a generator of its own: the trainer's random stream stays as it
            # was (each sample is seeded from its position anyway)
            generator=torch.Generator().manual_seed(self.stream_cfg.seed),
        )
        self._iter = iter(loader)
        _RUNNING.add(self)

    def next_raw_batch(self) -> tuple:
        """The next `(inputs, texts, info)` as the workers made it."""
        if self._iter is None:
            self._start()
        try:
            images, texts, info = next(self._iter)
        except StopIteration:
            if self.stream_cfg.mode == "eval":
                raise
            raise DataError(f"the {self.stream_cfg.mode} data stream ended; {self._where()}") from None
        except Exception as e:
            log.debug("data loader error", exc_info=True)
            raise DataError(f"{_original_message(e)}; {self._where()}") from None
        self.positions[info["role"]] = info["position"]
        self._shard_of[info["role"]] = info["shard"]
        self._retries_of[info["role"]] = info["storage_retries"]
        self.micro_batches += 1
        return images, texts, info

    @property
    def shards_finished(self) -> int:
        """Shards this rank's workers have read to the end, as far as the consumed batches show: each
        worker's shards before the one its latest batch ended in (an eval pass's progress; when the pass has
        ended, all of `eval_shards`)."""
        return sum(self._shard_of.values())

    @property
    def storage_retries(self) -> int:
        """Storage requests this rank's data workers retried; 0 without workers (the training process
        reads the shards, and counts its retries itself: `webshards.retries.retries_so_far`)."""
        return self._retries_before + sum(self._retries_of.values()) if self.workers else 0

    @property
    def eval_shards(self) -> int:
        """The shards of this rank's share of an eval pass: what its loader slots are dealt round-robin."""
        c, slots = self.stream_cfg, max(1, self.workers)
        plans = (
            ShardPlan(c.sources, c.weights, "eval", c.seed, c.rank * slots + role, c.world * slots)
            for role in range(slots)
        )
        return sum(plan.per_epoch for plan in plans)

    def _where(self) -> str:
        at = ", ".join(
            f"worker {role}: shard #{p.shard} sample {p.offset} epoch {p.epoch}"
            for role, p in sorted(self.positions.items())
        )
        return f"rank {self.stream_cfg.rank} after {self.micro_batches} batches ({at or 'at the start'})"

    def skipped_by_reason(self) -> dict[str, int]:
        total = Counter()
        for pos in self.positions.values():
            total.update(pos.skipped)
        return dict(total)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason().values())

    def state_dict(self) -> dict:
        return {
            "kind": "webdataset",
            "micro_batches": self.micro_batches,
            "workers": self.workers,
            "world": self.world,
            "positions": {role: asdict(p) for role, p in self.positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "webdataset":
            raise ValueError(f"checkpoint data state is {state.get('kind')!r}, this run reads shards")
        for key, now in (("workers", self.workers), ("world", self.world)):
            if state[key] != now:
                raise ValueError(
                    f"exact resume needs the checkpoint's {key} ({state[key]}); this run has {now}"
                )
        self.micro_batches = int(state["micro_batches"])
        self.positions = {int(r): Position(**p) for r, p in state["positions"].items()}
        self.close()

    def close(self) -> None:
        """Shut the workers down now (collecting the DataLoader iterator does the same, but later or never)."""
        running, self._iter = self._iter, None
        self._retries_before, self._retries_of = self.storage_retries, {}
        _RUNNING.discard(self)
        shutdown = getattr(running, "_shutdown_workers", None)  # torch's iterator with worker processes
        if shutdown is not None:
            shutdown()


def _original_message(error: Exception) -> str:
    """One line for an error of the stream: a DataLoader worker's error comes back as its type with the
    worker's traceback as the message, ending in `Type: message`; one raised here (workers=0) is bare."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = re.sub(rf"^([\w.]+\.)?{type(error).__name__}: ", "", lines[-1] if lines else "")
    return last if isinstance(error, DataError) else f"{type(error).__name__}: {last}"


class WebDatasetSource(StreamLoader):
    """Micro-batches for one rank from sharded WebDataset streams, with exact resume."""

    def __init__(
        self,
        spec: str,
        data_cfg,
        mode: str,
        seed: int,
        batch_size: int,
        rank: int,
        world: int,
        bundle,
        device,
        targets: str = "tokens",
    ):
        """`targets`: `tokens` (tokenised captions), or for eval sets `labels` (KEY.cls class indices) or
        `captions` (KEY.txt lines, untokenised)."""
        self.cfg, self.device, self.targets = data_cfg, device, targets
        sources = parse_spec(spec, data_cfg.train_weights if mode != "eval" else None)
        stream_cfg = StreamConfig(
            sources=tuple(s.urls for s in sources),
            weights=tuple(s.weight for s in sources),
            mode=mode,
            seed=seed, rank=rank, world=world, batch_size=batch_size, data=data_cfg,
        )  # fmt: skip
        self.stream_cfg = stream_cfg
        decode, collate, self.finish = self._decoders(bundle)
        super().__init__(
            stream_cfg, decode, collate, TARGETS.get(targets, bundle.tokenizer),
            pin_memory=data_cfg.pin_memory and device.type == "cuda",
        )  # fmt: skip
        total = sum(s.samples or 0 for s in sources)
        log.info("data: %d shards in %d sources (%s samples), %s sampling", sum(len(s.urls) for s in sources),
                 len(sources), total or "unknown", mode)  # fmt: skip

    def _decoders(self, bundle):
        from pretrain.models.build import image_size

        size = image_size(bundle.model)
        benchmark = self.targets != "tokens"
        kind = "cpu" if benchmark else self.cfg.decode  # eval sets: the plain CPU path
        transform = bundle.preprocess_train if self.stream_cfg.mode != "eval" else bundle.preprocess_val
        if kind == "cpu":
            text_key = "cls" if self.targets == "labels" else "txt"
            sample_transform, normalize = split_transform(transform)
            finish = functools.partial(_normalize_on, normalize, self.device) if normalize else None
            # eval sets decode in full, as clip_benchmark does, so results match it exactly
            return (
                functools.partial(
                    dec.decode_cpu,
                    transform=sample_transform,
                    size=0 if benchmark else size,
                    text_key=text_key,
                ),
                _stack,
                finish,
            )
        fast = TensorTransform.wrap(transform)
        if fast is None:
            raise ValueError(
                f"data.decode={kind} runs the model's transform on the device, and this one has a step that "
                f"only runs on PIL images ({transform}); use data.decode=cpu"
            )
        finish = DeviceFinish(fast, self.device, encoded=kind == "nvjpeg")
        decode = dec.raw_image_bytes if kind == "nvjpeg" else functools.partial(dec.decode_uint8, size=size)
        return decode, _as_list, finish

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts, _ = self.next_batch_with_info()
        return images, texts

    def next_batch_with_info(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        images, texts, info = self.next_raw_batch()
        if self.finish is not None:
            images = self.finish(images, info["seeds"])
        return images, texts, info
