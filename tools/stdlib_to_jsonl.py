"""Write the Python standard library's own source files as loose JSON, one file per line
(`{"text": <source>, "path": <relative path>}`): a real corpus that exists on every machine,
used by the quickstart.

    python tools/stdlib_to_jsonl.py --output quickstart_out/data/stdlib.jsonl [--max-mb 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from pathlib import Path


def stdlib_sources(root: str):
    """(relative path, text) of every .py file under `root`, sorted, site-packages excluded."""
    for dirpath, dirnames, filenames in os.walk(root):
        skip = ("site-packages", "dist-packages", "__pycache__")
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    raw = f.read()
                try:
                    yield os.path.relpath(path, root), raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # a few test files are deliberately not UTF-8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSONL file to write.")
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="Directory to read.")
    parser.add_argument("--max-mb", type=float, default=None, help="Stop after this much source text.")
    args = parser.parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    count = size = 0
    tmp = args.output + ".partial"
    with open(tmp, "w", encoding="utf-8") as out:
        for rel, text in stdlib_sources(args.root):
            out.write(json.dumps({"text": text, "path": rel}) + "\n")
            count += 1
            size += len(text.encode("utf-8"))
            if args.max_mb is not None and size >= args.max_mb * 1e6:
                break
    os.replace(tmp, args.output)
    print(f"Wrote {count} files ({size / 1e6:.1f} MB of source) from {args.root} to {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
