"""`pretrain caption` and pretrain.generate.search against open_clip's own `CoCa.generate`, token for token.

open_clip's `generate` needs transformers 4.56 (with huggingface_hub < 1), which the project does not install:
the reference runs in a subprocess with those packages put first on PYTHONPATH (tests/requirements-open-clip-
generate.txt, installed once into a cache folder from the package registry).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, private_packages, read_jsonl, trained_tiny_model
from PIL import Image

from pretrain.cli import main
from pretrain.generate.decoding import DecodingConfig
from pretrain.generate.search import generate, special_tokens
from pretrain.models.build import load_trained
from pretrain.publish.export import export
from webshards import progress
from webshards.layout import iter_shard

REQUIREMENTS = ROOT / "tests" / "requirements-open-clip-generate.txt"
REFERENCE = Path(__file__).with_name("open_clip_generate.py")

# (our CLI flags, open_clip generate's keyword arguments, seed): defaults, other beam settings, both samplers
SETTINGS = [
    ([], {}, 0),
    (
        ["--num-beams", "4", "--num-beam-groups", "2", "--max-length", "12", "--min-length", "3"],
        {"num_beams": 4, "num_beam_groups": 2, "seq_len": 12, "min_seq_len": 3},
        0,
    ),
    (["--decoding", "top_k", "--top-k", "3", "--seed", "7"], {"generation_type": "top_k", "top_k": 3}, 7),
    (
        ["--decoding", "top_p", "--top-p", "0.9", "--temperature", "0.8", "--seed", "7"],
        {"generation_type": "top_p", "top_p": 0.9, "temperature": 0.8},
        7,
    ),
]
OURS = [
    DecodingConfig(),
    DecodingConfig(num_beams=4, num_beam_groups=2, max_length=12, min_length=3),
    DecodingConfig(method="top_k", top_k=3),
    DecodingConfig(method="top_p", top_p=0.9, temperature=0.8),
]


def generate_packages() -> Path:
    """The folder holding open_clip generate's extra packages; installed on first use, then reused."""
    return private_packages(REQUIREMENTS, "open-clip-generate")


@pytest.fixture(scope="module")
def coca(demo_data, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny-coca run trained briefly on the demo data, and its export."""
    root = tmp_path_factory.mktemp("coca")
    run = trained_tiny_model(root, "tiny-coca", f"{demo_data}/train/{{00000..00003}}.tar", 20, 16)
    return run, export(run, root / "export")


@pytest.fixture(scope="module")
def image_files(demo_data, tmp_path_factory) -> list[str]:
    """Six held-out demo images as PNG files."""
    folder = tmp_path_factory.mktemp("images")
    samples = list(iter_shard(next((demo_data / "eval").glob("*.tar"))))[:6]
    paths = []
    for sample in samples:
        path = folder / f"{sample['__key__']}.png"
        Image.open(io.BytesIO(sample["jpg"])).convert("RGB").save(path)
        paths.append(str(path))
    return paths


def test_captions_equal_open_clip_generate_token_for_token(coca, image_files, tmp_path):
    run, exported = coca
    settings = [{"seed": seed, "kwargs": kwargs} for _, kwargs, seed in SETTINGS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(generate_packages()), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, str(REFERENCE), str(exported), json.dumps(settings), *image_files],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.strip().splitlines()[-1])

    bundle = load_trained(exported)
    model = bundle.model.eval()
    images = torch.stack([bundle.preprocess_val(Image.open(p).convert("RGB")) for p in image_files])
    ended = 0
    for (flags, _, seed), config, ref in zip(SETTINGS, OURS, reference, strict=True):
        torch.manual_seed(seed)
        ours = generate(model, images, config, special_tokens(model, bundle.tokenizer))
        assert ours.tolist() == ref["tokens"], flags
        out = tmp_path / "captions.jsonl"
        assert (
            main(
                [
                    "caption",
                    "--checkpoint",
                    str(exported),
                    "--images",
                    *image_files,
                    "--output",
                    str(out),
                    *flags,
                ]
            )
            == 0
        )
        lines = read_jsonl(out)
        assert [line["path"] for line in lines] == image_files
        assert [line["caption"] for line in lines] == ref["captions"], flags
        ended += sum(49407 in row[: config.max_length - 1] for row in ref["tokens"])  # before the limit
    assert ended > 0, "no caption ended before the length limit: the finishing rules went unchecked"
    # the run's checkpoint captions as its export does
    out = tmp_path / "from-run.jsonl"
    assert main(["caption", "--checkpoint", str(run), "--images", *image_files, "--output", str(out)]) == 0
    assert [line["caption"] for line in read_jsonl(out)] == reference[0]["captions"]


def first_samples(shard: Path, count: int, output: Path) -> Path:
    """A tar of the first `count` samples of `shard`, members in their order."""
    keys: set[str] = set()
    with tarfile.open(shard) as source, tarfile.open(output, "w") as target:
        for member in source:
            keys.add(member.name.split(".")[0])
            if len(keys) > count:
                break
            target.addfile(member, source.extractfile(member))
    return output


def test_shards_give_one_line_per_sample_in_order_with_its_key(
    coca, demo_data, tmp_path, caplog, monkeypatch
):
    """12 eval samples in batches of 8: a full batch and a partial one; progress lines of the shards and
    images (``PROGRESS_EVERY`` 0: a line per batch)."""
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)
    run, _ = coca
    shard = first_samples(next((demo_data / "eval").glob("*.tar")), 12, tmp_path / "00000.tar")
    keys = [sample["__key__"] for sample in iter_shard(shard)]
    assert len(keys) == 12
    out = tmp_path / "captions.jsonl"
    args = [
        "caption",
        "--checkpoint",
        str(run),
        "--shards",
        str(shard),
        "--max-length",
        "8",
        "--batch-size",
        "8",
    ]
    assert main([*args, "--output", str(out)]) == 0
    assert (
        "caption: 0/1 shards (0%), 8 img, " in caplog.text
    )  # the first batch, the shard not read to its end
    assert re.search(
        r"caption: 1/1 shards \(100%\), 12 img, [\d.,]+ img/s, elapsed \d+s, finished", caplog.text
    )
    lines = read_jsonl(out)
    assert [line["key"] for line in lines] == keys
    assert all(line["caption"] and "<" not in line["caption"] for line in lines)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "tiny-clip", "--images", "x.png"], "has no caption decoder"),
        (
            ["--checkpoint", "tiny-coca", "--images", "x.png", "--max-length", "40"],
            "longer than the decoder's context",
        ),
        (["--checkpoint", "tiny-coca", "--images", "missing.png"], "image not found: missing.png"),
        (
            ["--checkpoint", "tiny-coca", "--images", "x.png", "--num-beams", "5"],
            "multiple of num_beam_groups",
        ),
    ],
)
def test_bad_requests_are_one_line_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    assert main(["caption", *args, "--output", "out.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.jsonl"))
