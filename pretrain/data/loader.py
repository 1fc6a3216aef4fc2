"""The main-process side of the WebDataset pipeline: a DataLoader over `ShardStream`, its resume state,
and the device-side finishing of images (resize/crop/normalise on the GPU, optional nvJPEG decoding).

The DataLoader takes units from its workers round-robin, so a rank's units arrive in partition order (see
`pretrain.data.stream`). For training, each step's share of this rank is one unit of each of its partitions,
concatenated in partition order and cut into `train.accum_steps` micro-batches. A checkpoint stores every
partition's `Position` after the last step (gathered from all ranks), the number of steps and the run's
`data.partitions` and global batch, so a run resumes exactly on any number of ranks and workers that own
whole partitions.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import signal
import weakref
from collections import Counter
from dataclasses import asdict, replace

import torch
from torch.utils.data import DataLoader

from pretrain.data import decode as dec
from pretrain.data.plan import ShardPlan, source_weights
from pretrain.data.stream import DataError, Position, ShardStream, StreamConfig, check_topology
from pretrain.data.transform import TensorTransform, split_transform
from webshards.samples import IMAGE_EXTENSIONS
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
    through torchvision on CUDA), then its per-sample steps (resize/crop, colour jitter, grayscale), each
    image's random draws replayed from the seed the worker drew it with (the draws the `cpu` path makes),
    then normalise the batch and erase the rectangles RandomErasing drew for each image."""

    def __init__(self, transform: TensorTransform, device: torch.device, encoded: bool) -> None:
        self.transform, self.device, self.encoded = transform, device, encoded

    def __call__(self, images: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
        if self.encoded:
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device)
        out, patches = [], []
        for image, seed in zip(images, seeds, strict=True):
            # restore: the main process's own random streams are left as they were
            with dec.seeded(seed, restore=True):
                x = self.transform.apply(image.to(self.device, non_blocking=True))
                patches.append(self.transform.draw_erasing(x.shape[-2:]))
            out.append(x)
        return self.transform.erase(self.transform.normalize(torch.stack(out)), patches)


def _device_form(transform, decode: str) -> TensorTransform | None:
    """The transform's tensor form for `data.decode=device|nvjpeg`; None (logged) when it has a step that
    only runs on PIL images: it then runs whole in the loader workers, as with `data.decode=cpu`."""
    fast = TensorTransform.wrap(transform)
    if fast is None:
        log.warning(
            "data.decode=%s: the training transform has a step that only runs on PIL images, so it runs in "
            "the loader workers (as data.decode=cpu): %s", decode, " ".join(str(transform).split()),
        )  # fmt: skip
    return fast


class StreamLoader:
    """One rank's data from a `ShardStream` through a DataLoader, with each partition's `Position` kept for
    exact resume: `next_raw_batch` hands out units (an eval pass's batches), `next_micro_batch` the training
    micro-batches. Training streams never end: an error from the stream, or its end, is a `DataError`.

    `exact_batch=False` (ZSCL's reference stream, whose batch is per rank) resumes a checkpoint of another
    global batch by continuing every partition where it stood instead of refusing."""

    def __init__(
        self, stream_cfg: StreamConfig, decode, collate, tokenize, pin_memory: bool = False,
        accum_steps: int = 1, exact_batch: bool = True,
    ) -> None:  # fmt: skip
        self.decode, self.collate, self.tokenize = decode, collate, tokenize
        self.world = stream_cfg.world
        self.pin_memory, self.prefetch = pin_memory, stream_cfg.data.prefetch
        self.training, self.exact_batch = stream_cfg.mode != "eval", exact_batch
        self.micro_batch, self.accum = stream_cfg.batch_size, accum_steps
        self.global_batch = stream_cfg.batch_size * stream_cfg.world * accum_steps
        self.chosen_partitions = stream_cfg.partitions  # 0: one per slot now, or the checkpoint's
        self.max_workers = stream_cfg.data.workers
        if self.training and exact_batch and not self.chosen_partitions:
            stream_cfg = self._fit_workers(stream_cfg, None)
        self.stream_cfg = self._partitioned(stream_cfg, stream_cfg.total_partitions)
        if self.chosen_partitions:  # the default is checked once a checkpoint had its say
            self._check_topology()
        self.positions: dict[int, Position] = {}
        self.units = 0
        self.steps = 0
        """Training steps whose share this rank has read."""
        self._micro: list[tuple] = []  # the micro-batches of the current step not handed out yet
        self._before: dict[int, Position] = {}  # the positions before the current step
        self._shard_of: dict[int, int] = {}  # per partition: the shard number its latest unit ended in
        self._retries_of: dict[int, int] = {}  # per worker role: storage retries of its stream so far
        self._retries_before = 0  # of workers shut down earlier
        self._iter = None

    @property
    def workers(self) -> int:
        """DataLoader workers this rank runs (`data.workers`, or fewer: `_fit_workers`)."""
        return self.stream_cfg.data.workers

    def _partitioned(self, cfg: StreamConfig, partitions: int) -> StreamConfig:
        """`cfg` read as `partitions` partitions with units of `global batch / partitions` (training)."""
        if not self.training:  # an eval pass: one partition per loader slot, units of the eval batch
            return replace(cfg, partitions=0, unit=0)
        return replace(cfg, partitions=partitions, unit=max(1, self.global_batch // partitions))

    def _fit_workers(self, cfg: StreamConfig, partitions: int | None) -> StreamConfig:
        """`cfg` with the most loader workers, up to `data.workers`, whose slots own whole partitions: of a
        resumed run's `partitions`, or (None) of the default one per slot, which must divide the global batch
        (14 workers cannot share a batch of 512: 8 do). Said once when fewer than asked."""
        used = next(
            (
                w
                for w in range(self.max_workers, 1, -1)
                if (partitions or self.global_batch) % (self.world * w) == 0
            ),
            min(self.max_workers, 1),
        )
        if used != cfg.data.workers:
            log.warning(
                "data: %d of data.workers=%d loader workers read this run: %d rank(s) x workers must divide %s",
                used, self.max_workers, self.world,
                f"data.partitions={partitions}" if partitions else f"the global batch {self.global_batch}",
            )  # fmt: skip
        return replace(cfg, data=replace(cfg.data, workers=used))

    def _check_topology(self) -> None:
        c = self.stream_cfg
        if self.training:
            check_topology(c.partitions, c.world, c.slots, self.global_batch if self.exact_batch else None)

    def _start(self) -> None:
        self._check_topology()
        dataset = ShardStream(self.stream_cfg, self.decode, self.collate, self.tokenize, dict(self.positions))
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
        """The next unit `(inputs, texts, info)` as the workers made it."""
        if self._iter is None:
            self._start()
        try:
            images, texts, info = next(self._iter)
        except StopIteration:
            if not self.training:
                raise
            raise DataError(f"the {self.stream_cfg.mode} data stream ended; {self._where()}") from None
        except Exception as e:
            log.debug("data loader error", exc_info=True)
            raise DataError(f"{_original_message(e)}; {self._where()}") from None
        self.positions[info["partition"]] = info["position"]
        self._shard_of[info["partition"]] = info["shard"]
        self._retries_of[info["role"]] = info["storage_retries"]
        self.units += 1
        return images, texts, info

    def next_micro_batch(self) -> tuple:
        """The next training micro-batch `(inputs, texts, info)` of this rank; `info` has its keys, seeds and
        epochs and the step it belongs to."""
        if not self._micro:
            self._read_step()
        return self._micro.pop(0)

    def _read_step(self) -> None:
        """This rank's share of the next global batch: a unit of each of its partitions, in order, cut into
        `accum` micro-batches."""
        self._before = dict(self.positions)
        per_rank = self.stream_cfg.partitions // self.world
        units = [self.next_raw_batch() for _ in range(per_rank)]
        expected = [self.stream_cfg.rank * per_rank + i for i in range(per_rank)]
        got = [info["partition"] for _, _, info in units]
        if got != expected:  # the workers' round-robin is what orders them
            raise RuntimeError(f"units of partitions {got} arrived for a step that needs {expected}")
        pin = self.pin_memory
        images, texts = _concat([u[0] for u in units], pin), _concat([u[1] for u in units], pin)
        infos = [u[2] for u in units]
        keys, seeds = sum((i["keys"] for i in infos), []), sum((i["seeds"] for i in infos), [])
        epochs = sum((i["epochs"] for i in infos), [])
        size = len(keys) // self.accum
        self._micro = [
            (images[a : a + size], texts[a : a + size],
             {"keys": keys[a : a + size], "seeds": seeds[a : a + size], "epochs": epochs[a : a + size],
              "step": self.steps})
            for a in range(0, size * self.accum, size)
        ]  # fmt: skip
        self.steps += 1

    @property
    def shards_finished(self) -> int:
        """Shards this rank's workers have read to the end, as far as the consumed batches show: each
        partition's shards before the one its latest unit ended in (an eval pass's progress; when the pass has
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
        c = self.stream_cfg
        partitions = [p for role in range(c.slots) for p in c.owned(role)]
        return sum(
            ShardPlan(c.sources, c.weights, "eval", c.seed, p, c.total_partitions).per_epoch
            for p in partitions
        )

    def _where(self) -> str:
        at = ", ".join(
            f"partition {p}: shard #{pos.shard} sample {pos.offset} epoch {pos.epoch}"
            for p, pos in sorted(self.positions.items())
        )
        return f"rank {self.stream_cfg.rank} after {self.units} batches ({at or 'at the start'})"

    def skipped_by_reason(self) -> dict[str, int]:
        total = Counter()
        for pos in self.positions.values():
            total.update(pos.skipped)
        return dict(total)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason().values())

    def state_dict(self) -> dict:
        """Where this rank's partitions stand after the micro-batches handed out; within a step (only read
        ahead by `DevicePrefetcher`), where they stood before it and how many of its micro-batches were taken."""
        taken = self.accum - len(self._micro) if self._micro else 0
        positions = self._before if taken else self.positions
        return {
            "kind": "webdataset",
            "format": 2,
            "partitions": self.stream_cfg.total_partitions,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "steps": self.steps - (1 if taken else 0),
            "taken": taken,
            "positions": {p: asdict(pos) for p, pos in positions.items()},
        }

    def load_state_dict(self, state: dict | list[dict]) -> None:
        """Resume from a checkpoint's data state: every rank's (a list, in rank order, as the checkpoint
        gathers it; any number of ranks and workers that own whole partitions) or this rank's own."""
        states = [_upgraded(s, r) for r, s in enumerate(state)] if isinstance(state, list) else [
            _upgraded(state, self.stream_cfg.rank)
        ]  # fmt: skip
        first = states[0]
        partitions, batch = first["partitions"], first["global_batch"]
        if self.chosen_partitions and self.chosen_partitions != partitions:
            raise ValueError(
                f"data.partitions={self.chosen_partitions}, but the checkpoint's run reads {partitions} partitions: "
                f"a run's sample order is fixed when it starts; leave data.partitions unset or set it to {partitions}"
            )
        if batch is not None and batch != self.global_batch:
            if self.exact_batch:
                raise ValueError(
                    f"exact resume needs the checkpoint's global batch {batch} (train.batch_size x ranks x "
                    f"train.accum_steps); this run's is {self.global_batch}"
                )
            log.warning("data: resuming a stream of global batch %d with %d", batch, self.global_batch)
        taken = first["taken"]
        if taken and (first["micro_batch"], len(states)) != (self.micro_batch, self.world):
            raise ValueError(
                "a data state saved within a step resumes only with the same ranks and micro-batch"
            )
        if self.training and not self.chosen_partitions:
            self.stream_cfg = self._fit_workers(self.stream_cfg, partitions)
        self.stream_cfg = self._partitioned(self.stream_cfg, partitions)
        self._check_topology()
        self.positions = {int(p): Position(**pos) for s in states for p, pos in s["positions"].items()}
        self.units, self.steps, self._micro, self._before = 0, first["steps"], [], {}
        self.close()
        if taken:  # read the step again and leave out what was handed out
            self._read_step()
            self._micro = self._micro[taken:]

    def close(self) -> None:
        """Shut the workers down now (collecting the DataLoader iterator does the same, but later or never)."""
        running, self._iter = self._iter, None
        self._retries_before, self._retries_of = self.storage_retries, {}
        _RUNNING.discard(self)
        shutdown = getattr(running, "_shutdown_workers", None)  # torch's iterator with worker processes
        if shutdown is not None:
            shutdown()


def _concat(parts: list, pin: bool = False):
    """Units' images or texts as one batch: tensors concatenated (one unit: itself), lists joined. `pin`: into
    page-locked memory, as the DataLoader pinned the units (the copy to the GPU does not pin it again)."""
    if len(parts) == 1:
        return parts[0]
    if not isinstance(parts[0], torch.Tensor):
        return [x for part in parts for x in part]
    if not pin:
        return torch.cat(parts)
    first = parts[0]
    out = torch.empty((sum(len(p) for p in parts), *first.shape[1:]), dtype=first.dtype, pin_memory=True)
    return torch.cat(parts, out=out)


def _upgraded(state: dict, rank: int) -> dict:
    """A data state of this version from one written before partitions (format 1): each loader slot's stream
    (rank x workers + worker) is the partition of that number; it continues where it stood."""
    if state.get("kind") != "webdataset":
        raise ValueError(f"checkpoint data state is {state.get('kind')!r}, this run reads shards")
    if state.get("format") == 2:
        return state
    slots = max(1, state["workers"])
    return {
        "partitions": state["world"] * slots, "global_batch": None, "micro_batch": None, "steps": 0, "taken": 0,
        "positions": {rank * slots + int(role): pos for role, pos in state["positions"].items()},
    }  # fmt: skip


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
        accum_steps: int = 1,
        exact_batch: bool = True,
    ):
        """`targets`: `tokens` (tokenised captions), or for eval sets `labels` (KEY.cls class indices) or
        `captions` (KEY.txt lines, untokenised). `batch_size`: the micro-batch (training) or eval batch."""
        self.cfg, self.device, self.targets = data_cfg, device, targets
        weights = source_weights(spec, data_cfg.train_weights, data_cfg.train_upsampling_factors)
        sources = parse_spec(spec, weights if mode != "eval" else None)
        stream_cfg = StreamConfig(
            sources=tuple(s.urls for s in sources),
            weights=tuple(s.weight for s in sources),
            mode=mode,
            seed=seed, rank=rank, world=world, batch_size=batch_size, data=data_cfg,
            partitions=data_cfg.partitions or 0,
        )  # fmt: skip
        self.stream_cfg = stream_cfg
        decode, collate, self.finish = self._decoders(bundle)
        super().__init__(
            stream_cfg, decode, collate, TARGETS.get(targets, bundle.tokenizer),
            pin_memory=data_cfg.pin_memory and device.type == "cuda", accum_steps=accum_steps,
            exact_batch=exact_batch,
        )  # fmt: skip
        total = sum(s.samples or 0 for s in sources)
        log.info("data: %d shards in %d sources (%s samples), %s sampling", sum(len(s.urls) for s in sources),
                 len(sources), total or "unknown", mode)  # fmt: skip

    def _decoders(self, bundle):
        from pretrain.models.build import image_size

        size = image_size(bundle.model)
        benchmark = self.targets != "tokens"
        transform = bundle.preprocess_train if self.stream_cfg.mode != "eval" else bundle.preprocess_val
        fast = None if benchmark or self.cfg.decode == "cpu" else _device_form(transform, self.cfg.decode)
        # eval sets are clip_benchmark's layout (KEY.cls / KEY.txt); training reads data.text_key / image_key
        text_key = {"labels": "cls", "captions": "txt"}.get(self.targets, self.cfg.text_key)
        image_keys = self.cfg.image_keys if not benchmark else IMAGE_EXTENSIONS
        max_pixels = None if benchmark else self.cfg.max_image_pixels
        if fast is None:  # eval sets, data.decode=cpu, or a transform only PIL runs: the plain CPU path
            sample_transform, normalize = split_transform(transform)
            finish = functools.partial(_normalize_on, normalize, self.device) if normalize else None
            # eval sets decode in full, as clip_benchmark does, so results match it exactly
            return (
                functools.partial(
                    dec.decode_cpu,
                    transform=sample_transform,
                    size=0 if benchmark else size,
                    text_key=text_key,
                    image_keys=image_keys,
                    max_pixels=max_pixels,
                ),
                _stack,
                finish,
            )
        nvjpeg = self.cfg.decode == "nvjpeg"
        decode = (
            functools.partial(dec.raw_image_bytes, text_key=text_key, max_pixels=max_pixels)
            if nvjpeg
            else functools.partial(
                dec.decode_uint8, size=size, text_key=text_key, image_keys=image_keys, max_pixels=max_pixels
            )
        )
        return decode, _as_list, DeviceFinish(fast, self.device, encoded=nvjpeg)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, texts, _ = self.next_batch_with_info()
        return images, texts

    def next_batch_with_info(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A training micro-batch (an eval pass: its next batch), finished on the device."""
        images, texts, info = self.next_micro_batch() if self.training else self.next_raw_batch()
        if self.finish is not None:
            images = self.finish(images, info["seeds"])
        return images, texts, info
