"""Read checkpoint files without running code from them: `safe_load` (torch.load with weights only) and
DCP folders (`safe_dcp_load`).

DCP's own reader unpickles `.metadata` with plain `pickle.load` and non-tensor values with
`torch.load(weights_only=False)`: a downloaded FSDP checkpoint could run anything when `pretrain eval` or
`export` opens it. `safe_dcp_load` reads the metadata through an unpickler that builds only DCP's own
metadata records (and the torch types they name), and the values with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects other than tensors and plain containers."""


_TORCH_LOAD = torch.load
"""torch.load as imported (`weights_only_loads` replaces `torch.load` for a while)."""


def safe_load(path: Any, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """`torch.load(weights_only=True)`: a file that would need any other class to unpickle is refused."""
    kwargs.pop("weights_only", None)
    try:
        return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"would call {found.group(1)}" if found else "holds more than tensors and plain containers"
        raise UnsafeCheckpointError(
            f"{path}: refusing to load it: unpickling it {what} (only tensors and plain containers are "
            "allowed; a checkpoint from an older version or an unknown source cannot be opened safely)"
        ) from None


@contextlib.contextmanager
def weights_only_loads(allowed: list) -> Iterator[None]:
    """Every `torch.load` becomes `safe_load` (with the classes `allowed` as well) for the duration: for
    libraries that call `torch.load(weights_only=False)` themselves (DeepSpeed)."""
    with torch.serialization.safe_globals(allowed):
        torch.load = safe_load
        try:
            yield
        finally:
            torch.load = _TORCH_LOAD


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
}
_ALLOWED = {
    **_METADATA_CLASSES,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch", "Size"): torch.Size,
    **{("pathlib", c.__name__): c for c in (Path, PosixPath, WindowsPath, PurePosixPath, PureWindowsPath)},
    **{("torch", n): getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata records and nothing else (the "restricting globals" recipe of the pickle docs)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load it: its metadata names {module}.{name}, which a DCP "
                "checkpoint does not hold"
            )
        return _ALLOWED[(module, name)]


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            unpickler = _MetadataUnpickler(stream)
            unpickler.path = path
            metadata = unpickler.load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise UnsafeCheckpointError(f"{path}: not DCP metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor values (optimizer hyper-parameters) with weights_only=True."""

    refused: UnsafeCheckpointError | None = None

    def load_bytes(self, read_item: Any, value: Any) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            self.refused = UnsafeCheckpointError(f"refusing to load DCP value {fqn!r}: it is not plain data")
            raise self.refused from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_dcp_load(state: dict, folder: Path, no_dist: bool) -> None:
    """`dcp.load(state, checkpoint_id=folder)` with the safe reader and planner; a refusal surfaces as
    UnsafeCheckpointError. The metadata is checked first: DCP logs a failed read with its traceback and
    wraps every failure in CheckpointException (a BaseException)."""
    reader, planner = SafeReader(str(folder)), SafeLoadPlanner()
    if (folder / ".metadata").is_file():
        reader.read_metadata()
    try:
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=no_dist)
    except CheckpointException:
        if planner.refused is not None:
            raise planner.refused from None
        raise
