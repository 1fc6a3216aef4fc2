"""`data.*`: the training stream (shards, tables, sampling, decoding, keys) and `data.aug.*`, open_clip's
augmentation settings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pretrain.config_sections.base import _check


@dataclass
class AugConfig:
    """open_clip's `AugmentationCfg` (open_clip_train's `--aug-cfg`), same names and defaults: the training
    transform open_clip builds with it runs on the `cpu`, `device` and `nvjpeg` paths alike (docs/data.md).
    Settings open_clip would ignore with a warning are errors here, naming the key."""

    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    """RandomResizedCrop's range of the crop's area, as fractions of the image's: [min, max] in (0, 1]."""
    ratio: list[float] | None = None
    """Range of the crop's aspect ratio (w/h), [min, max] (timm's transform only: needs use_timm;
    null: [3/4, 4/3])."""
    color_jitter: list[float] | None = None
    """ColorJitter strengths [brightness, contrast, saturation, hue] (hue <= 0.5). open_clip's transform
    needs all four and color_jitter_prob; timm's (use_timm) jitters every image and also takes three."""
    re_prob: float | None = None
    """timm's RandomErasing: the chance an image gets erased rectangles of per-pixel noise, after
    normalisation (needs use_timm)."""
    re_count: int | None = None
    """RandomErasing: up to this many rectangles per erased image (needs re_prob; null: 1)."""
    use_timm: bool = False
    """Build the transform with timm's `create_transform` (RandomResizedCrop with ratio, ColorJitter,
    RandomErasing) instead of open_clip's own (RandomResizedCrop, jitter and grayscale with probabilities)."""
    color_jitter_prob: float | None = None
    """open_clip's transform: the chance of colour jitter per image (needs color_jitter, not use_timm)."""
    gray_scale_prob: float | None = None
    """open_clip's transform: the chance an image is made grayscale (3 channels; not with use_timm)."""

    def __post_init__(self) -> None:
        self._check_ranges()
        timm_only = {"ratio": self.ratio, "re_prob": self.re_prob, "re_count": self.re_count}
        for name, value in timm_only.items():
            _check(
                value is None or self.use_timm,
                f"data.aug.{name}",
                "open_clip uses it only with use_timm=true",
            )
        for name in ("color_jitter_prob", "gray_scale_prob"):
            _check(
                getattr(self, name) is None or not self.use_timm,
                f"data.aug.{name}",
                "timm's transform (use_timm=true) has no such setting; open_clip drops it",
            )
        _check(self.re_count is None or self.re_prob, "data.aug.re_count", "needs data.aug.re_prob")
        jitter, prob = self.color_jitter, self.color_jitter_prob
        _check(
            prob is None or jitter is not None, "data.aug.color_jitter_prob", "needs data.aug.color_jitter"
        )
        _check(
            jitter is None or self.use_timm or (prob is not None and len(jitter) == 4),
            "data.aug.color_jitter",
            "open_clip's transform takes 4 values [brightness, contrast, saturation, hue] with "
            "data.aug.color_jitter_prob (or set use_timm=true)",
        )

    def _check_ranges(self) -> None:
        for name, (lo, hi) in {"scale": (0, 1), "ratio": (0, float("inf"))}.items():
            value = getattr(self, name)
            _check(
                value is None or (len(value) == 2 and lo < value[0] <= value[1] <= hi),
                f"data.aug.{name}",
                f"must be [min, max] with {lo} < min <= max{f' <= {hi}' if hi == 1 else ''}, got {value}",
            )
        jitter = self.color_jitter
        _check(
            jitter is None
            or (len(jitter) in (3, 4) and min(jitter) >= 0 and (len(jitter) == 3 or jitter[3] <= 0.5)),
            "data.aug.color_jitter",
            f"must be 3 or 4 values >= 0 (hue <= 0.5), got {jitter}",
        )
        for name in ("re_prob", "color_jitter_prob", "gray_scale_prob"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= 1, f"data.aug.{name}", f"must be in [0, 1], got {value}")
        _check(
            self.re_count is None or self.re_count >= 1,
            "data.aug.re_count",
            f"must be >= 1, got {self.re_count}",
        )

    def to_open_clip(self) -> dict:
        """The settings as open_clip's `aug_cfg` (its `AugmentationCfg` fields; unset ones left out)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None}


@dataclass
class DataConfig:
    train: str = "synthetic"
    """Shard spec (brace-expanded, `::`-joined sources) or the word `synthetic`."""
    train_weights: list[float] | None = None
    """Sampling weight of each `::`-joined source (needs `sampling=resampled`)."""
    train_upsampling_factors: list[float] | None = None
    """open_clip's `--train-data-upsampling-factors`: a factor per `::` source that weighs each of its shards,
    so a source is drawn in proportion to factor x its shard count (`train_weights` sets the sources'
    proportions directly). Needs `sampling=resampled`; not with `train_weights`."""
    sampling: str = "epoch"
    """`epoch` (every shard once per epoch, split across ranks and workers) or `resampled` (shards drawn
    with replacement by weight, the LAION-5B recipe)."""
    partitions: int | None = None
    """Canonical partitions of the training stream, each with its own shards and shuffle; every step takes
    `global batch / partitions` samples from each, so the sample order does not depend on ranks or workers.
    Ranks x max(1, workers) must divide it. null: one per loader slot of the run's first start (a checkpoint
    keeps its number). Set it (e.g. 64) to resume on any topology that divides it."""
    shuffle_buffer: int = 1000
    """Samples per shuffle block of each partition (1: no sample shuffling)."""
    workers: int = 0
    """Data-loading worker processes per rank (0: load in the training process)."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    pin_memory: bool = True
    """Pin host batches for faster copies to the GPU (ignored on CPU)."""
    decode: str = "cpu"
    """`cpu` (decode + model transform in workers), `device` (workers decode at reduced size; resize and
    normalise on the device) or `nvjpeg` (workers pass JPEG bytes; the GPU decodes)."""
    max_bad_fraction: float = 0.5
    """Stop when more than this fraction of the last `bad_window` samples of a partition were bad."""
    bad_window: int = 1000
    """Samples per partition over which `max_bad_fraction` is measured."""
    retries: int = 3
    """Retries (with exponential backoff) to open an http(s)://, pipe: or local shard before skipping it;
    s3:// requests are retried by the S3 client (AWS_MAX_ATTEMPTS, see docs/scaling.md)."""
    synthetic_classes: int = 16
    """Synthetic data: number of latent classes (images and texts of a class correlate, so loss falls)."""
    aug: AugConfig = field(default_factory=AugConfig)
    """Training augmentation: open_clip's `AugmentationCfg` settings (`data.aug.*`)."""
    text_key: str = "txt"
    """Where a sample's caption is: a tar member's extension (`txt`: the whole text is one caption, as
    img2dataset writes it), or `json:FIELD`, a field of its KEY.json; a field holding a list is several
    captions, one drawn per sample per epoch from the sample's seed. `;` separates alternatives tried in order
    (`txt;caption`, `json:a;b`: the first holding a caption wins), as open_clip's `--text-key` and
    `--json-text-key`."""
    image_key: str = "jpg;jpeg;png;webp"
    """Tar member extensions that may hold the image, `;`-separated; the first present is used (open_clip's
    webdataset reader: `jpg;png;jpeg;webp`)."""
    max_image_pixels: int | None = None
    """A training image of more pixels (width x height, read from its header before decoding) is a bad sample,
    `too_many_pixels` (open_clip main's `--max-image-pixels`, whose default is 25,000,000); null: only PIL's own
    decompression-bomb limit."""
    table_image_key: str = "filepath"
    """`data.train` a .csv/.tsv/.parquet/.jsonl table: the column of image paths (relative to the table's
    folder) or URLs (open_clip's `--csv-img-key`)."""
    table_caption_key: str = "title"
    """A table's caption column; a column of lists gives several captions (open_clip's `--csv-caption-key`)."""
    table_separator: str | None = None
    """A .csv/.tsv table's separator (open_clip's `--csv-separator`; `\\t` or `tab` for a tab); null: a tab if
    the header line has one (open_clip's default), else a comma."""
    table_samples_per_shard: int | None = None
    """A table's rows per shard when its shards are built; null: enough for 64 shards, at most 10000."""

    @property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.image_key.split(";") if k.strip())

    def __post_init__(self) -> None:
        self._check_keys()
        _check(
            self.sampling in ("epoch", "resampled"),
            "data.sampling",
            f"must be epoch or resampled, got {self.sampling!r}",
        )
        _check(
            self.partitions is None or self.partitions > 0,
            "data.partitions",
            f"must be > 0 or null, got {self.partitions}",
        )
        _check(
            self.train_weights is None or self.sampling == "resampled",
            "data.train_weights",
            "needs data.sampling=resampled (epoch sampling reads every shard once and ignores weights)",
        )
        _check(
            self.train_upsampling_factors is None or self.sampling == "resampled",
            "data.train_upsampling_factors",
            "needs data.sampling=resampled (as open_clip's needs --dataset-resampled)",
        )
        _check(
            self.train_upsampling_factors is None or self.train_weights is None,
            "data.train_upsampling_factors",
            "give it or data.train_weights, not both (both set the sources' proportions)",
        )
        factors = self.train_upsampling_factors or [1.0]
        _check(
            min(factors) >= 0 and sum(factors) > 0,
            "data.train_upsampling_factors",
            f"must be >= 0 with a positive sum, got {factors}",
        )
        _check(
            self.decode in ("cpu", "device", "nvjpeg"),
            "data.decode",
            f"must be cpu, device or nvjpeg, got {self.decode!r}",
        )
        for name in ("workers", "retries"):
            _check(getattr(self, name) >= 0, f"data.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("shuffle_buffer", "prefetch", "bad_window", "synthetic_classes"):
            _check(getattr(self, name) > 0, f"data.{name}", f"must be > 0, got {getattr(self, name)}")
        _check(0 < self.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in (0, 1]")
        _check(
            self.max_image_pixels is None or self.max_image_pixels > 0,
            "data.max_image_pixels",
            f"must be > 0 or null, got {self.max_image_pixels}",
        )

    def _check_keys(self) -> None:
        member, colon, fields = self.text_key.partition(":")
        names = fields.split(";") if colon else member.split(";")
        _check(
            all(name and name == name.strip() for name in names) and (not colon or member == "json"),
            "data.text_key",
            f"must be member extensions (txt, or txt;caption) or json:FIELD[;FIELD], got {self.text_key!r}",
        )
        _check(bool(self.image_keys), "data.image_key", f"names no extension: {self.image_key!r}")
        _check(
            self.table_samples_per_shard is None or self.table_samples_per_shard > 0,
            "data.table_samples_per_shard",
            f"must be > 0 or null, got {self.table_samples_per_shard}",
        )
        for name in ("table_image_key", "table_caption_key"):
            _check(bool(getattr(self, name)), f"data.{name}", "must name a column")
        if self.table_separator in ("\\t", "tab"):  # what a shell passes for a tab
            self.table_separator = "\t"
        _check(
            self.table_separator is None or len(self.table_separator) == 1,
            "data.table_separator",
            f"must be one character or null, got {self.table_separator!r}",
        )
