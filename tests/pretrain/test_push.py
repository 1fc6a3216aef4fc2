"""`pretrain push`: to a local stand-in Hub with the real huggingface_hub client, and to S3 (moto)."""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import pytest
from helpers import ROOT, moto_s3, run_cmd
from hub_server import serve_hub

from pretrain.cli import main

SECRET = "hf_TEST_SECRET_do_not_print_8f3a"

# Runs `pretrain push` once per argv list in one process, every log record of every logger (root and
# huggingface_hub, DEBUG) written to the file named by the first argument.
PUSH_WITH_LOG = """
import json, logging, sys
logging.basicConfig(level=logging.DEBUG, filename=sys.argv[1], format="%(name)s %(levelname)s %(message)s")
from pretrain.cli import main
sys.exit(max(main(argv) for argv in json.loads(sys.argv[2])))
"""


def write_export(folder: Path, weights: bytes, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """A minimal export folder (config, weights, card and `extra` files); returns its files' bytes."""
    files = {
        "open_clip_config.json": json.dumps({"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}}).encode(),
        "open_clip_model.safetensors": weights,
        "README.md": b"---\nlibrary_name: open_clip\n---\n# test\n",
        **(extra or {}),
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


@pytest.fixture
def exports(tmp_path) -> tuple[Path, dict, Path, dict]:
    """Two exports: the second changes the weights, drops `extra.txt` and adds `tokenizer/vocab.txt`."""
    first, second = tmp_path / "export1", tmp_path / "export2"
    header = b"\x10" + bytes(7)  # weights start like safetensors (a little-endian length): binary, so LFS
    one = write_export(first, header + os.urandom(200_000), {"extra.txt": b"only in the first push\n"})
    two = write_export(second, header + os.urandom(300_000), {"tokenizer/vocab.txt": b"a\nb\n"})
    return first, one, second, two


def push_env(hub_url: str, tmp: Path) -> dict:
    return {"HF_ENDPOINT": hub_url, "HF_TOKEN": SECRET, "HF_HUB_DISABLE_XET": "1", "HF_HUB_VERBOSITY": "debug",
            "HF_HOME": str(tmp / "hf-home"), "PYTHONPATH": str(ROOT)}  # fmt: skip


def test_push_to_hub_arrives_byte_identical_and_never_shows_the_token(tmp_path, exports):
    first, one, second, two = exports
    log = tmp_path / "push.log"
    argv = [
        ["push", "--export", str(e), "--repo-id", "lab/tiny", "--revision", "v1", "--private"]
        for e in (first, second)
    ]
    with serve_hub(SECRET) as hub:
        proc = run_cmd(
            [sys.executable, "-c", PUSH_WITH_LOG, str(log), json.dumps(argv)], env=push_env(hub.url, tmp_path)
        )
        assert proc.returncode == 0, proc.stderr
        assert hub.unknown == [] and len(hub.commits) == 2
        assert hub.repos["lab/tiny"]["private"] is True
        # The second push replaces the weights; extra.txt of the first stays, as upload_folder keeps files.
        gitattributes = hub.files("lab/tiny", "main")[".gitattributes"]
        assert hub.files("lab/tiny", "v1") == {
            **two,
            "extra.txt": one["extra.txt"],
            ".gitattributes": gitattributes,
        }
        assert set(hub.files("lab/tiny", "main")) == {".gitattributes"}
        assert any(r.startswith("PUT /lfs/") for r in hub.requests)  # the weights went through LFS
    assert "lab/tiny" in proc.stdout and "DEBUG" in log.read_text()  # the log did capture the client
    written = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    assert all(SECRET.encode() not in text for text in [proc.stdout.encode(), proc.stderr.encode(), *written])


def test_push_dry_run_lists_files_and_sizes_and_uploads_nothing(tmp_path, exports, s3, monkeypatch, capsys):
    first, one, _, _ = exports
    with serve_hub(SECRET) as hub:
        for key, value in push_env(hub.url, tmp_path).items():
            monkeypatch.setenv(key, value)
        assert main(["push", "--export", str(first), "--repo-id", "lab/m", "--private", "--dry-run"]) == 0
        assert hub.requests == [] and hub.repos == {}
    to_hub = capsys.readouterr()
    assert "private model repo lab/m" in to_hub.out and SECRET not in to_hub.out + to_hub.err
    assert main(["push", "--export", str(first), "--to", "s3://bucket/dry", "--dry-run"]) == 0
    for out in (to_hub.out, capsys.readouterr().out):
        listed = {
            line.split()[1]: int(line.split()[0]) for line in out.splitlines() if line.split()[0].isdigit()
        }
        assert listed == {
            **{rel: len(data) for rel, data in one.items()},
            "total": sum(map(len, one.values())),
        }
    # nothing under the target (moto's in-process backend is shared: other modules' tests leave objects)
    assert "Contents" not in s3.client.list_objects_v2(Bucket="bucket", Prefix="dry/")


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        (lambda d: None, [], "export folder not found"),
        (lambda d: (d.mkdir(), (d / "open_clip_config.json").write_text("{}")), [], "no open_clip_model.safetensors"),
        (lambda d: write_export(d, b"w"), ["--revision", "v1"], "apply to --repo-id only"),
    ],
)  # fmt: skip
def test_bad_push_is_one_line_and_exit_2(tmp_path, capsys, make, extra, message):
    folder = tmp_path / "export"
    make(folder)
    assert main(["push", "--export", str(folder), "--to", str(tmp_path / "store"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("pretrain push: error:")
    assert not (tmp_path / "store").exists()


class S3:
    """The moto S3 server of a test: its boto3 client and the backend (to read objects' write times)."""

    def __init__(self, client, backend):
        self.client, self.backend = client, backend

    def objects(self, prefix: str) -> dict[str, bytes]:
        listing = self.client.list_objects_v2(Bucket="bucket", Prefix=prefix + "/").get("Contents", [])
        return {o["Key"][len(prefix) + 1 :]: self.client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
                for o in listing}  # fmt: skip

    def write_times(self, prefix: str) -> dict[str, object]:
        keys = self.backend.buckets["bucket"].keys
        return {k[len(prefix) + 1 :]: keys[k].last_modified for k in keys if k.startswith(prefix + "/")}


@pytest.fixture
def s3(monkeypatch):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    with moto_s3(monkeypatch) as client:
        yield S3(client, s3_backends[DEFAULT_ACCOUNT_ID]["aws"])


def expected_marker(files: dict[str, bytes]) -> dict:
    return {"files": {rel: {"size": len(d), "crc32": f"{zlib.crc32(d):08x}"} for rel, d in files.items()}}


def test_push_to_s3_writes_every_file_then_the_marker_last(exports, s3):
    first, one, second, two = exports
    s3.client.put_object(Bucket="bucket", Key="models/tiny/notes/other.txt", Body=b"not from a push")
    for export, files in ((first, one), (second, two)):  # the second push replaces the first
        assert main(["push", "--export", str(export), "--to", "s3://bucket/models/tiny"]) == 0
        stored = s3.objects("models/tiny")
        assert json.loads(stored.pop("_COMPLETE")) == expected_marker(files)
        assert stored.pop("notes/other.txt") == b"not from a push"  # what no push wrote is left alone
        assert stored == files  # byte-identical; extra.txt of the first push is gone after the second
        times = s3.write_times("models/tiny")
        assert times["_COMPLETE"] > max(t for rel, t in times.items() if rel != "_COMPLETE")


def test_interrupted_push_leaves_no_marker(exports, s3, monkeypatch):
    from webshards.urls import url_to_fs

    first, _, second, _ = exports
    assert main(["push", "--export", str(first), "--to", "s3://bucket/m"]) == 0
    calls = []

    def failing_put(lpath, rpath, **kwargs):  # the network fails on the first upload
        calls.append(rpath)
        raise OSError("connection reset")

    fs = url_to_fs("s3://bucket/m")[0]  # the instance push uses (fsspec caches filesystems)
    monkeypatch.setattr(fs, "put_file", failing_put)
    assert main(["push", "--export", str(second), "--to", "s3://bucket/m"]) == 2
    assert calls and "_COMPLETE" not in s3.objects("m")  # the old export no longer reads as complete


def test_push_help_and_a_bad_flag(capsys):
    assert main(["push", "--help"]) == 0 and "--repo-id" in capsys.readouterr().out
    status = main(["push", "--export", "e", "--repo-id", "lab/m", "--to", "s3://bucket/m"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "not allowed with argument" in err
