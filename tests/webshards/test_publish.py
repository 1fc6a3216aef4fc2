"""publish: a folder under a URL, the `_COMPLETE` manifest last; a re-publish removes only what the old
marker listed (today's manifest or an older checkpoint marker's plain sizes); a bad marker is one line; a
sealed folder's own manifest, and `check_files` against it (sizes, CRC-32, older sha256)."""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from pathlib import Path

import fsspec
import pytest

from webshards.outputs import join
from webshards.publish import MARKER, check_files, listed_sizes, publish, seal


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def entries(files: dict[str, bytes]) -> dict:
    return {rel: {"size": len(d), "crc32": f"{zlib.crc32(d):08x}"} for rel, d in files.items()}


@pytest.fixture(params=["local", "memory"])
def target(request, tmp_path) -> str:
    """A local folder, or a URL on fsspec's in-memory store (a remote location: the URL code path)."""
    if request.param == "local":
        return str(tmp_path / "published")
    return f"memory://publish-{uuid.uuid4().hex}/prefix"


def stored(url: str) -> dict[str, bytes]:
    fs, base = fsspec.core.url_to_fs(url)
    return {p[len(base.rstrip("/")) + 1 :]: fs.cat_file(p) for p in fs.find(base)}


def test_publish_writes_every_file_then_a_manifest_marker(tmp_path, target):
    files = {"a.bin": b"x" * 100, "sub/b.txt": b"hello\n"}
    publish(write_folder(tmp_path / "f", files), target, step=7)
    got = stored(target)
    assert json.loads(got.pop(MARKER)) == {"step": 7, "files": entries(files)}
    assert got == files


def test_republish_removes_only_what_the_old_marker_listed(tmp_path, target):
    one = {"keep.txt": b"1", "dropped.txt": b"old", "sub/x": b"2"}
    two = {"keep.txt": b"new", "added/y": b"3"}
    publish(write_folder(tmp_path / "one", one), target)
    with fsspec.open(f"{target}/notes/other.txt", "wb", auto_mkdir=True) as f:
        f.write(b"not published")
    publish(write_folder(tmp_path / "two", two), target)
    got = stored(target)
    assert json.loads(got.pop(MARKER)) == {"files": entries(two)}
    assert got == {**two, "notes/other.txt": b"not published"}


def test_an_old_checkpoint_marker_of_plain_sizes_is_read(tmp_path, target):
    old = {"model.safetensors": b"m" * 10, "rank_00000.pt": b"r"}
    publish(write_folder(tmp_path / "old", old), target)
    with fsspec.open(f"{target}/{MARKER}", "wb") as f:  # the format remote checkpoints had before
        f.write(json.dumps({"step": 2, "files": {rel: len(d) for rel, d in old.items()}}).encode())
    assert listed_sizes(stored(target)[MARKER], "x") == {"model.safetensors": 10, "rank_00000.pt": 1}
    new = {"model.safetensors": b"n" * 12}
    publish(write_folder(tmp_path / "new", new), target, step=3)
    assert stored(target) == {**new, MARKER: stored(target)[MARKER]}


@pytest.mark.parametrize(
    "marker, message",
    [
        (b"not json", "not a _COMPLETE manifest"),
        (b'{"done": true}', "not a _COMPLETE manifest"),
        (b'{"files": {"../outside": 3}}', "bad file name '../outside'"),
        (b'{"files": {"/etc/passwd": {"size": 3}}}', "bad file name '/etc/passwd'"),
    ],
)
def test_a_marker_that_is_no_manifest_is_refused_before_anything_changes(tmp_path, target, marker, message):
    publish(write_folder(tmp_path / "one", {"a": b"1"}), target)
    with fsspec.open(f"{target}/{MARKER}", "wb") as f:
        f.write(marker)
    with pytest.raises(ValueError, match=message) as refused:
        publish(write_folder(tmp_path / "two", {"b": b"2"}), target)
    assert "\n" not in str(refused.value) and stored(target) == {"a": b"1", MARKER: marker}


def test_join_puts_the_name_into_the_path(tmp_path):
    assert join("https://u:p@h/models?sig=t&se=1", "run") == "https://u:p@h/models/run?sig=t&se=1"
    assert join("s3://bucket/prefix/", "a/b") == "s3://bucket/prefix/a/b"
    assert join(f"file://{tmp_path}", "run") == tmp_path / "run"


def test_a_sealed_folder_goes_up_with_its_own_marker(tmp_path, target):
    """A checkpoint folder carries its manifest (`seal`, written last); publishing it uploads that marker
    (`extra` added) without hashing the files again."""
    files = {"model.safetensors": b"m" * 50, "dcp/__0_0.distcp": b"d" * 7}
    folder = write_folder(tmp_path / "f", files)
    seal(folder, step=4)
    assert json.loads((folder / MARKER).read_bytes()) == {"step": 4, "files": entries(files)}
    publish(folder, target, step=4)
    got = stored(target)
    assert got.pop(MARKER) == (folder / MARKER).read_bytes() and got == files


def test_check_files_names_the_first_file_that_differs(tmp_path):
    files = {"a.bin": b"x" * 100, "sub/b.pt": b"y" * 10}
    folder = write_folder(tmp_path / "f", files)
    seal(folder)
    marker = (folder / MARKER).read_bytes()
    assert check_files(folder, marker, "m") is None
    data = bytearray(files["sub/b.pt"])
    data[3] ^= 0x01  # one flipped bit: same size, another checksum
    (folder / "sub/b.pt").write_bytes(bytes(data))
    assert check_files(folder, marker, "m") == (
        "sub/b.pt",
        "its crc32 differs from the one _COMPLETE lists (corrupted)",
    )
    assert check_files(folder, marker, "m", sums=False) is None
    (folder / "a.bin").write_bytes(b"x" * 60)  # sizes are compared first, every file
    assert check_files(folder, marker, "m") == (
        "a.bin",
        "60 bytes, _COMPLETE lists 100 (truncated or overwritten)",
    )
    (folder / "a.bin").unlink()
    assert check_files(folder, marker, "m") == ("a.bin", "missing (_COMPLETE lists it)")


def test_markers_of_sha256_checksums_are_still_checked(tmp_path):
    """Manifests written before CRC-32 listed sha256: still verified, with that checksum."""
    folder = write_folder(tmp_path / "f", {"w.bin": b"w" * 30})
    digest = hashlib.sha256(b"w" * 30).hexdigest()
    assert (
        check_files(folder, json.dumps({"files": {"w.bin": {"size": 30, "sha256": digest}}}).encode(), "m")
        is None
    )
    wrong = json.dumps({"files": {"w.bin": {"size": 30, "sha256": "0" * 64}}}).encode()
    assert check_files(folder, wrong, "m") == (
        "w.bin",
        "its sha256 differs from the one _COMPLETE lists (corrupted)",
    )
