"""Reading DCP checkpoints without running code from them (DESIGN rule 13).

PyTorch's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load`, and
`DefaultLoadPlanner.load_bytes` loads byte entries with `torch.load(weights_only=False)`: a
planted checkpoint could run arbitrary code on `--load` or in `tools/checkpoint/convert.py`.
Here the metadata goes through an unpickler that rebuilds only DCP's own metadata types
(dataclasses, torch.Size, dtypes, layouts, paths), and byte entries load with
`weights_only=True`. Anything else is refused with `UnsafeCheckpointError` naming the file
and the type it asked for; nothing from the file runs.
"""
from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

# (module, name) pairs a DCP `.metadata` pickle may name; found by recording what the
# metadata of real checkpoints asks for (plain and distributed optimizer, TP/PP, bytes).
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


UNSAFE_MARK = "refusing to load"  # in every refusal, so callers find it inside DCP's wrappers


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asked to rebuild something that is not checkpoint metadata."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                           torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.path}: {UNSAFE_MARK} {module}.{name} (a checkpoint's metadata "
                                    "holds only DCP metadata types; this file may be malicious)")


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata is read by the allowlist unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Byte entries (non-tensor values) load with `weights_only=True` instead of a full
    unpickle; otherwise DCP's default planner (same placement of the loaded value)."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn}: {UNSAFE_MARK} it: "
                                        f"refused by the weights-only loader ({_culprit(e)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _culprit(error: Exception) -> str:
    """The line of torch's long weights-only message that names the refused global."""
    lines = str(error).splitlines()
    return next((ln.strip() for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
