"""The README and docs/ stay true to the code they document."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from neuroprune_ds.cli import build_parser
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.config_loader import config_from_dict, validate
from neuroprune_ds.train import config_reference

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {path: path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
# Pages and scripts the README links that other branches of the project add: a missing one is tolerated,
# an existing one is checked like any other. Drop an entry once it exists.
def _fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def test_config_reference_is_generated_from_the_dataclass_docstrings():
    text = (ROOT / "docs" / "config.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    section = text[text.index(start) + len(start):text.index(end)]
    assert section.strip() == f"```text\n{config_reference()}\n```", (
        "docs/config.md is stale: run python tools/update_config_reference.py")


def test_first_screen_gives_the_two_make_targets_that_exist():
    first_screen = "\n".join(README.splitlines()[:15])
    first_block = _fenced_blocks(first_screen, "bash")[0]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_readme_has_the_sections_a_user_needs_and_stays_short():
    headings = re.findall(r"^## (.+)$", README, re.M)
    # "Adding an architecture" is named by neuroprune_ds/arch.py's error for an unknown model_type.
    for needed in ("What it does", "Your own DeepSpeed loop", "A training run: config and launchers",
                   "Export to Hugging Face", "Resuming and preemption", "Adding an architecture", "Tests"):
        assert needed in headings, (needed, headings)
    assert len(README.splitlines()) <= 260, "move detail into docs/ and link it"


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", sorted(DOCS), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading_of_the_repository(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", DOCS[page]):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to missing {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.M)
            assert anchor in {_github_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"


@pytest.mark.parametrize("page", sorted(DOCS), ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_named_in_the_docs_exist(page):
    for path in re.findall(r"`((?:neuroprune_ds|tools|launch|tests|ds_configs|docs)/[\w./*-]*\w)", DOCS[page]):
        assert list(ROOT.glob(path)), f"{page.name} names {path}, which does not exist"


def test_the_readme_run_config_is_valid():
    (example,) = _fenced_blocks(README, "yaml")
    run = config_from_dict(yaml.safe_load(example))
    assert validate(run) == []
    assert run.neuroprune.target_sparsity == 0.5


def test_commands_and_options_in_the_docs_exist():
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for page, text in DOCS.items():
        for block in _fenced_blocks(text, "bash"):
            for command in re.findall(r"^neuroprune (\S+)", block, re.M):
                assert command in subcommands, f"{page.name}: no subcommand neuroprune {command}"
        for command, rest in re.findall(r"\bneuroprune (validate|train|convert|report)\b([^\n`]*)", text):
            options = {o for action in subcommands[command]._actions for o in action.option_strings}
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", rest):
                assert flag in options, f"{page.name}: neuroprune {command} has no option {flag}"
    (block,) = [b for b in _fenced_blocks(README, "bash") if "neuroprune convert" in b]
    convert = {o for action in subcommands["convert"]._actions for o in action.option_strings}
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", block):
        assert flag in convert, f"README: neuroprune convert has no option {flag}"


def _setting(name: str, value: str):
    """``neuroprune.<name>: <value>`` (YAML, as a run config would write it) loaded and validated."""
    run = config_from_dict({"model": {"name_or_path": "model"}, "data": {"train": "train.jsonl"},
                            "neuroprune": {name: yaml.safe_load(value)}})
    assert validate(run) == [], (name, value)
    return getattr(run.neuroprune, name)


def test_algorithm_decision_table_lists_every_option_with_its_default():
    table = _section((ROOT / "docs" / "algorithm.md").read_text(), "Decisions at a glance")
    documented = dict(re.findall(r"\| `(\w+): ([^`]+)`", table))
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(NeuroPruneConfig)}
    for name, value in documented.items():
        assert name in defaults, f"docs/algorithm.md lists {name}, which NeuroPruneConfig does not have"
        assert _setting(name, value) == defaults[name], f"{name}: documented {value}, default {defaults[name]!r}"
    not_decisions = {"enabled", "target_modules", "exclude_modules"}
    assert set(defaults) - not_decisions - set(documented) == set(), "undocumented algorithm options"


def test_every_setting_named_in_the_algorithm_page_is_a_valid_one():
    text = (ROOT / "docs" / "algorithm.md").read_text()
    fields = {f.name for f in dataclasses.fields(NeuroPruneConfig)}
    settings = [(name, value) for name, value in re.findall(r"`(\w+): ([^`]+)`", text) if name in fields]
    assert len(settings) > 20
    for name, value in settings:
        _setting(name, value)
