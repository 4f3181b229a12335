#!/usr/bin/env python3
"""Make notebooks name the project's kernel, "starling" ("Python (starling)"), the one `make setup`
installs; nothing else in them changes (cells, ids, outputs are kept).

    .venv/bin/python scripts/set_kernelspec.py notebooks/03_kwise_reward_training.ipynb ...
    .venv/bin/python scripts/set_kernelspec.py --check notebooks/*.ipynb   # exit 1 if any differs
"""

import argparse
import sys
from pathlib import Path

import nbformat

from starling_lib.notebook_format import KERNELSPEC, set_kernelspec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help=".ipynb files to update in place")
    parser.add_argument("--check", action="store_true", help="only report notebooks that name another kernel")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    differ = []
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        current = dict(nb.metadata.get("kernelspec", {}))
        if current == KERNELSPEC:
            print(f"ok       {path}")
            continue
        differ.append(path)
        if args.check:
            print(f"differs  {path}: kernelspec {current or 'missing'}")
        else:
            nbformat.write(set_kernelspec(nb), path)
            print(f"updated  {path}: kernelspec {current.get('name', 'missing')!r} -> {KERNELSPEC['name']!r}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
