"""`pretrain push`: publish an export folder to the Hugging Face Hub or to any fsspec store.

Hub (`--repo-id`): `create_repo` (exist_ok) and one `upload_folder` commit with `huggingface_hub`; the
endpoint comes from `HF_ENDPOINT`, the token from `HF_TOKEN` or the saved login, and is only ever handed to
the client (never printed, logged or written).

Store (`--to URL`): `webshards.publish` puts every file under the URL, then the marker `_COMPLETE` last (a
manifest of sizes and CRC-32 checksums); a re-push deletes only the files the old marker listed that the
export lacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from webshards.publish import MARKER, publish

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip reads either


def export_files(folder: str | Path) -> dict[str, int]:
    """Relative path -> size of each file of a complete export (hidden files left out).

    Raises ValueError, one line naming the folder and what is missing, for anything else.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"export folder not found: {root}")
    missing = [] if (root / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if not any((root / w).is_file() for w in WEIGHT_FILES):
        missing.append(WEIGHT_FILES[0])
    if missing:
        raise ValueError(
            f"{root} is not a complete export: no {' and no '.join(missing)} (write one with `pretrain export`)"
        )
    try:
        ok = "model_cfg" in json.loads((root / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ValueError(f"{root / CONFIG_FILE}: not an open_clip config (no model_cfg)")
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            files[rel] = path.stat().st_size
    return files


def file_listing(files: dict[str, int]) -> list[str]:
    """One `SIZE  PATH` line per file (size in bytes) and a total line, for --dry-run."""
    lines = [f"{size:>14}  {rel}" for rel, size in files.items()]
    return [*lines, f"{sum(files.values()):>14}  total bytes in {len(files)} files"]


def push_to_url(folder: str | Path, url: str, dry_run: bool = False) -> list[str]:
    """Upload the export under `url` (any fsspec URL), the `_COMPLETE` marker last; returns report lines."""
    root, files = Path(folder), export_files(folder)
    url = url.rstrip("/")
    if dry_run:
        return [
            f"would upload to {url}:",
            *file_listing(files),
            f"then write {url}/{MARKER} (size and CRC-32 of each file)",
        ]
    try:
        publish(root, url, files)
    except OSError as e:  # a store or network failure: one line; the marker is not there
        raise RuntimeError(f"push to {url} failed: {e}") from None
    return [f"pushed {len(files)} files ({sum(files.values())} bytes) to {url}, then {MARKER}"]


def hub_endpoint() -> str:
    """The Hub's URL: `HF_ENDPOINT` when set, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hub_plan(files: dict[str, int], repo_id: str, revision: str | None, private: bool) -> list[str]:
    from huggingface_hub import get_token

    visibility = "private" if private else "public"
    token = "found" if get_token() else "none (set HF_TOKEN or log in)"
    head = f"would create {visibility} model repo {repo_id} at {hub_endpoint()} (if absent)"
    return [f"{head} and commit to {revision or 'main'}; token: {token}", *file_listing(files)]


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """Create `repo_id` if absent and commit the export to `revision` (a branch, made if absent).

    Like `upload_folder` (and open_clip's `push_to_hf_hub`), files already in the repo that the export
    lacks are kept. Returns report lines.
    """
    from huggingface_hub import HfApi, get_token

    files = export_files(folder)
    if dry_run:
        return _hub_plan(files, repo_id, revision, private)
    if not get_token():
        raise ValueError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(endpoint=hub_endpoint())
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, allow_patterns=list(files),
            commit_message=f"pretrain push of {Path(folder).name}",
        )  # fmt: skip
    except Exception as e:  # the client's HTTP and transport errors: one line, never a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"push to {repo_id} at {hub_endpoint()} failed: {type(e).__name__}: {first}"
        ) from None
    return [
        f"pushed {len(files)} files ({sum(files.values())} bytes) to {repo_id} ({revision or 'main'}): {commit.commit_url}"
    ]
