"""Fetch, verify and cache the real weights, tokenizers and data (see tools/assets.py).

    python tools/fetch_assets.py --all            # fetch everything (cached after the first time)
    python tools/fetch_assets.py smollm2 botchan  # fetch some
    python tools/fetch_assets.py --all --check    # only verify what is cached; fetch nothing

Prints each asset's path, size and time taken; exits 1 if any asset failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import assets  # tools/ is on sys.path when run as a script


def disk_size(path: Path) -> int:
    """Bytes used by a file, or by every file under a directory.

    Returns:
        The total size in bytes.
    """
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line.

    Returns:
        The arguments, with ``names`` filled in from ``--all``.
    """
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"assets: {', '.join(assets.ASSET_NAMES)}")
    parser.add_argument("--all", action="store_true", help="every asset")
    parser.add_argument("--check", action="store_true", help="only verify cached assets and their checksums")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in assets.ASSET_NAMES]
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from {', '.join(assets.ASSET_NAMES)}")
    if args.all == bool(args.names):
        parser.error("name the assets to fetch, or pass --all (not both)")
    if args.all:
        args.names = list(assets.ASSET_NAMES)
    return args


def main(argv: list[str] | None = None) -> int:
    """Fetch or verify the requested assets.

    Returns:
        0 if every asset succeeded, else 1.
    """
    args = parse_args(argv)
    action = assets.verify if args.check else assets.fetch
    print(f"cache: {assets.cache_root()}")
    failed = 0
    for name in args.names:
        start = time.perf_counter()
        try:
            path = action(name)
        except RuntimeError as err:
            print(f"{name:16s} FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        seconds = time.perf_counter() - start
        print(f"{name:16s} {disk_size(path) / 1e6:9.1f} MB {seconds:7.1f} s  {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
