"""On-disk cache of dataset index arrays (spec §2.9): `{md5}-{Class}-{split}-{suffix}` files,
where md5 hashes the dataset's JSON description. A hit needs every file; writes go through
temporary names and the description is renamed into place last, so an interrupted write is a
miss, never a half-read cache."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from megatron_lite.data.errors import DataError


def describe(identifiers: dict) -> tuple[str, str]:
    """(description, md5 of its UTF-8): `json.dumps(indent=4)` as Megatron writes it."""
    text = json.dumps(identifiers, indent=4)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


class CacheWriteError(OSError):
    """The cache directory cannot be written; the message names --data-cache-path."""


@dataclass(frozen=True)
class IndexCache:
    directory: str
    base: str  # "{md5}-{Class}-{split}"

    def path(self, suffix: str) -> str:
        return os.path.join(self.directory, f"{self.base}-{suffix}")

    def load(self, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        paths = [self.path("description.txt")] + [self.path(f"{n}.npy") for n in names]
        if not all(os.path.isfile(p) for p in paths):
            return None
        return {n: self._load_array(self.path(f"{n}.npy")) for n in names}

    @staticmethod
    def _load_array(path: str) -> np.ndarray:
        # Index arrays are plain integers: refusing pickles keeps a planted .npy from running code
        # (DESIGN rule 13), and a damaged file is named instead of failing later inside a sample.
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: unreadable dataset index cache ({str(e).splitlines()[0]}); delete it "
                            "to rebuild the indices") from None
        if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2):
            raise DataError(f"{path}: not a dataset index array ({array.dtype}, {array.ndim} dimensions); "
                            "delete it to rebuild the indices")
        return array

    def save(self, description: str, arrays: dict[str, np.ndarray]) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            for name, array in arrays.items():
                self._atomic(f"{name}.npy", lambda f, a=array: np.save(f, a, allow_pickle=False))
            self._atomic("description.txt", lambda f: f.write(description.encode("utf-8")))
        except OSError as e:
            raise CacheWriteError(f"cannot write dataset index cache in {self.directory} "
                                  f"({e.strerror or e}); pass a writable directory with "
                                  "--data-cache-path") from None

    def _atomic(self, suffix: str, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{self.base}-{suffix}.")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, self.path(suffix))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
