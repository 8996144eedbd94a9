"""The README stays true to the code it documents."""

import re
from pathlib import Path

from neuroprune_ds.train import config_reference

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_config_reference_is_generated_from_the_dataclass_docstrings():
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    section = README[README.index(start) + len(start):README.index(end)]
    assert section.strip() == f"```text\n{config_reference()}\n```", (
        "README configuration reference is stale: run python tools/update_readme_config.py")


def test_first_screen_gives_the_two_make_targets_that_exist():
    first_screen = "\n".join(README.splitlines()[:15])
    assert "make demo" in first_screen and "make test" in first_screen
    makefile = (Path(__file__).resolve().parent.parent / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target
