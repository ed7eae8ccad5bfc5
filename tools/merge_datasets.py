"""Merge every `X.bin`/`X.idx` pair in a directory into one dataset, in sorted prefix order
(spec §1.5 "append another dataset"):

    python tools/merge_datasets.py --input DIR --output-prefix OUT [--multimodal]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megatron_lite.data.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    data_file_path,
    index_file_path,
)


def find_prefixes(directory: str, exclude: str | None = None) -> list[str]:
    """Sorted prefixes of the `.bin`/`.idx` pairs in `directory`; a lone half is an error."""
    stems: dict[str, set] = {}
    for name in os.listdir(directory):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, name)):
            stems.setdefault(stem, set()).add(ext)
    prefixes = []
    for stem in sorted(stems):
        prefix = os.path.join(directory, stem)
        if exclude and os.path.abspath(prefix) == os.path.abspath(exclude):
            continue
        missing = {".bin", ".idx"} - stems[stem]
        if missing:
            raise FileNotFoundError(f"{prefix}{missing.pop()} is missing (its pair exists)")
        prefixes.append(prefix)
    if not prefixes:
        raise FileNotFoundError(f"--input {directory}: no .bin/.idx pairs")
    return prefixes


def merge(prefixes: list[str], output_prefix: str, multimodal: bool = False) -> None:
    dtypes = {p: IndexedDataset(p, multimodal=multimodal).dtype for p in prefixes}  # validates every input
    builder = IndexedDatasetBuilder(output_prefix, dtypes[prefixes[0]], multimodal=multimodal)
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize()
    except BaseException:
        builder.abort()
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Directory holding the datasets to merge.")
    parser.add_argument("--output-prefix", required=True, help="Prefix of the merged .bin/.idx.")
    parser.add_argument("--multimodal", action="store_true", help="The datasets carry a modes array.")
    args = parser.parse_args(argv)
    try:
        prefixes = find_prefixes(args.input, exclude=args.output_prefix)
        merge(prefixes, args.output_prefix, args.multimodal)
    except (OSError, IndexedDatasetError) as e:  # OSError: --input not a directory, unwritable output
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Merged {len(prefixes)} datasets into {data_file_path(args.output_prefix)} and "
          f"{index_file_path(args.output_prefix)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
