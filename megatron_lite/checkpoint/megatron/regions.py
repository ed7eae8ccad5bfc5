"""Reading rectangular regions of a DCP checkpoint's global tensors into our own tensors.

A Megatron checkpoint's keys do not line up with our state dict one to one (layers stacked on
a leading axis, SwiGLU parts, flat optimizer buffers), so DCP's default planner, which maps
key to key, cannot load it. `read_regions` instead takes explicit requests — "rows
[o, o+n) of key K go into this tensor" — and lets DCP's storage reader fetch exactly those
bytes: each rank reads only what it holds, whatever layout wrote the files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_lite.checkpoint.layout import CheckpointError
from megatron_lite.checkpoint.safe_load import SafeFileSystemReader


@dataclass
class Region:
    """Copy global tensor `key`'s block at `offsets` (of `dest`'s shape) into `dest`."""

    key: str
    offsets: tuple[int, ...]
    dest: torch.Tensor


def _narrow(tensor: torch.Tensor, offsets, lengths) -> torch.Tensor:
    for dim, (start, length) in enumerate(zip(offsets, lengths)):
        tensor = tensor.narrow(dim, start, length)
    return tensor


class _RegionPlanner(LoadPlanner):
    """Plans the reads for a list of regions plus whole byte entries (kept raw, unpickled
    later by the caller's allowlist unpickler)."""

    def __init__(self, regions: list[Region], byte_keys: list[str]):
        self.regions, self.byte_keys, self.raw = regions, byte_keys, {}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, region in enumerate(self.regions):
            stored = self.metadata.state_dict_metadata[region.key]
            chunk = ChunkStorageMetadata(offsets=torch.Size(region.offsets), sizes=region.dest.shape)
            for item in create_read_items_for_chunk_list(region.key, stored, [chunk]):
                # dest_index names the region, so resolve_tensor finds its tensor.
                dest = MetadataIndex(str(i), item.dest_index.offset)
                items.append(dataclasses.replace(item, dest_index=dest))
        for key in self.byte_keys:
            items.append(ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(key),
                                  dest_offsets=torch.Size((0,)), storage_index=MetadataIndex(key),
                                  storage_offsets=torch.Size((0,)), lengths=torch.Size((0,))))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        self.raw[read_item.dest_index.fqn] = value.read()

    def resolve_tensor(self, read_item) -> torch.Tensor:
        dest = self.regions[int(read_item.dest_index.fqn)].dest
        return _narrow(dest, read_item.dest_offsets, read_item.lengths)

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the copy is in place


def check_region(metadata: Metadata, region: Region, directory: str) -> None:
    """One line when the checkpoint lacks the key or the region falls outside its tensor."""
    stored = metadata.state_dict_metadata.get(region.key)
    if not isinstance(stored, TensorStorageMetadata):
        raise CheckpointError(f"{directory}: the checkpoint has no tensor {region.key}")
    size, want = tuple(stored.size), tuple(region.dest.shape)
    ends = [o + n for o, n in zip(region.offsets, want)]
    if len(size) != len(want) or any(e > s for e, s in zip(ends, size)):
        raise CheckpointError(f"{directory}: {region.key} has shape {list(size)} in the checkpoint; this "
                              f"run needs a block of {list(want)} at {list(region.offsets)} "
                              "(a different model shape?)")


def read_regions(directory: str, metadata: Metadata, regions: list[Region], byte_keys=()) -> dict[str, bytes]:
    """Fill every region from `directory` (one DCP read on this rank); returns the raw bytes of
    `byte_keys`. Regions are checked against the metadata first."""
    for region in regions:
        check_region(metadata, region, directory)
    for key in byte_keys:
        if not isinstance(metadata.state_dict_metadata.get(key), BytesStorageMetadata):
            raise CheckpointError(f"{directory}: the checkpoint has no entry {key}")
    reader = SafeFileSystemReader(directory)
    reader.set_up_storage_reader(metadata, True)
    planner = _RegionPlanner(regions, list(byte_keys))
    planner.set_up_planner({}, metadata, True)
    plan = reader.prepare_local_plan(planner.create_local_plan())
    reader.read_data(plan, planner).wait()
    return planner.raw
