"""BlendedDataset: interleaves several datasets so that every prefix of the stream follows the
blend weights as closely as possible (spec §2.8), with its indices cached like GPTDataset's."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from megatron_lite.data.blending_indices import build_blending_indices, build_exhaustive_blending_indices
from megatron_lite.data.errors import DataError
from megatron_lite.data.index_cache import IndexCache, describe

_INDEX_NAMES = ("dataset_index", "dataset_sample_index")


class BlendedDataset:
    """Position t serves sample `dataset_sample_index[t]` of dataset `dataset_index[t]`.

    `size=None` blends exhaustively: every sample of every dataset exactly once.
    """

    def __init__(self, datasets: list, weights: list[float], size: int | None, split: str,
                 path_to_cache: str | None = None, log: Callable[[str], None] | None = None):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets, self.split, self.size = datasets, split, size
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        log = log or (lambda msg: None)
        self.unique_identifiers = OrderedDict([
            ("class", "BlendedDataset"), ("datasets", [d.unique_identifiers for d in datasets]),
            ("split", split), ("weights", self.weights), ("size", size)])
        self.unique_description, self.unique_description_hash = describe(self.unique_identifiers)
        cache = IndexCache(path_to_cache, f"{self.unique_description_hash}-BlendedDataset-{split}") \
            if path_to_cache else None
        hit = cache.load(_INDEX_NAMES) if cache else None
        if hit is not None:
            log(f"Load the BlendedDataset {split} indices from {cache.directory}")
            self.dataset_index, self.dataset_sample_index = hit["dataset_index"], hit["dataset_sample_index"]
        else:
            log(f"Build and save the BlendedDataset {split} indices")
            if size is None:
                built = build_exhaustive_blending_indices([len(d) for d in datasets])
            else:
                built = build_blending_indices(self.weights, size)
            self.dataset_index, self.dataset_sample_index = built
            if cache:
                cache.save(self.unique_description, dict(zip(_INDEX_NAMES, built)))
        source = cache.path("dataset_index.npy") if hit is not None else "the built indices"
        self._check_not_oversampled(source)

    def _check_not_oversampled(self, source: str) -> None:
        index = np.asarray(self.dataset_index, dtype=np.int64)
        if len(index) != len(self.dataset_sample_index) or (len(index) and index.min() < 0):
            raise DataError(f"{source}: damaged {self.split} blend indices (dataset index of {len(index)} "
                            f"entries, sample index of {len(self.dataset_sample_index)}); delete the cache "
                            "files to rebuild them")
        used = np.bincount(index, minlength=len(self.datasets))
        if len(used) > len(self.datasets):
            raise DataError(f"{source}: damaged {self.split} blend indices (they name dataset "
                            f"{len(used) - 1} of a blend of {len(self.datasets)}); delete the cache files to "
                            "rebuild them")
        for i, d in enumerate(self.datasets):
            if used[i] > len(d):
                raise IndexError(
                    f"The {self.split} blend oversamples the contributing datasets: dataset {i} "
                    f"({d.dataset_path or 'mock'}) is asked for {used[i]} samples but has {len(d)}; "
                    "--mid-level-dataset-surplus may be increased to build more samples per dataset")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        sample["dataset_id"] = d
        return sample
