"""Regenerate the README's configuration reference from the config dataclasses' docstrings.

    python tools/update_readme_config.py        # rewrite the section in place
    python tools/update_readme_config.py --check  # exit 1 when the README is stale
"""

import argparse
import sys
from pathlib import Path

from neuroprune_ds.train import config_reference

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def rendered() -> str:
    return f"{START}\n```text\n{config_reference()}\n```\n{END}"


def current(text: str) -> str:
    return text[text.index(START):text.index(END) + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = README.read_text()
    if args.check:
        stale = current(text) != rendered()
        if stale:
            print("README configuration reference is stale: run python tools/update_readme_config.py")
        return int(stale)
    README.write_text(text.replace(current(text), rendered()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
