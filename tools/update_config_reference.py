"""Regenerate the configuration reference (docs/config.md) from the config dataclasses' docstrings.

    python tools/update_config_reference.py          # rewrite the reference in place
    python tools/update_config_reference.py --check  # exit 1 when docs/config.md is stale
"""

import argparse
import sys
from pathlib import Path

from neuroprune_ds.train import config_reference

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "config.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
STALE = "docs/config.md is stale: run python tools/update_config_reference.py"


def rendered() -> str:
    return f"{START}\n```text\n{config_reference()}\n```\n{END}"


def current(text: str) -> str:
    return text[text.index(START):text.index(END) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = REFERENCE.read_text()
    if args.check:
        stale = current(text) != rendered()
        if stale:
            print(STALE)
        return int(stale)
    REFERENCE.write_text(text.replace(current(text), rendered()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
