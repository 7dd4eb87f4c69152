"""The README and docs/ stay true to the tree: every relative link resolves (file and heading), the flags page is
the parser's, and the README stays a front page."""
import glob
import os
import re
import sys

import pytest
from test_train import ROOT

sys.path.insert(0, os.path.join(ROOT, "docs"))
import make_flags  # noqa: E402

PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    with open(path) as f:
        return {slug(line.lstrip("#")) for line in f if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(page):
    text = open(page).read()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(resolved), f"{os.path.relpath(page, ROOT)}: {target} does not exist"
        if anchor:
            assert anchor in anchors(resolved), f"{os.path.relpath(page, ROOT)}: {target}: no such heading"


def test_the_flags_page_is_the_parsers():
    """Regenerate with python docs/make_flags.py after adding or changing a flag."""
    assert open(make_flags.PAGE).read() == make_flags.flags_page()
    import config
    for action in config.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert f"`{action.option_strings[0]}" in make_flags.flags_page()


def test_the_presets_table_is_methods_presets():
    """Regenerate with python docs/make_flags.py after adding or changing a preset."""
    assert open(make_flags.PRESETS_PAGE).read() == make_flags.presets_page()
    table = make_flags.presets_table()
    import config
    for name in make_flags.methods.PRESETS:
        assert f"| `{name}` |" in table
        resolved = config.build_parser().parse_args([f"--preset={name}"])
        shown = table.split(f"| `{name}` | ")[1].split(" | ")[0].replace("`fgsm` + ", make_flags.methods.FGSM + " ")
        shown_args = config.build_parser().parse_args(shown.replace("`", "").split())
        assert vars(shown_args) == {**vars(resolved), "preset": None}  # the flags shown are what the preset stands for


def test_make_flags_help_prints_help_and_writes_nothing(capsys, monkeypatch):
    monkeypatch.setattr(make_flags, "PAGE", os.devnull + "-not-written")  # a write would fail loudly
    with pytest.raises(SystemExit) as stop:
        make_flags.main(["--help"])
    assert stop.value.code == 0 and "Write docs/flags.md from train.py's parser" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        make_flags.main(["--page=x"])
    assert stop.value.code == 2


@pytest.mark.parametrize("script", ["train.py", "eval.py", "report.py", "surface.py"])
def test_help_points_to_pages_and_sections_that_exist(script, capsys):
    """A pointer in --help to a docs/ page or heading, or to a README section, resolves."""
    import importlib
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for page, anchor in re.findall(r"(docs/[\w-]+\.md)(?:#([\w-]+))?", text):
        assert os.path.exists(os.path.join(ROOT, page)), f"{script} --help: {page} does not exist"
        assert not anchor or anchor in anchors(os.path.join(ROOT, page)), f"{script} --help: {page}#{anchor}"
    readme = anchors(PAGES[0])
    for section in re.findall(r"README(?:'s)?:? \"?([A-Z][\w ,-]+)", text):
        assert slug(section) in readme, f"{script} --help names the README section {section!r}, which is not there"


def test_the_repository_has_the_licence_its_readme_names():
    licence = open(os.path.join(ROOT, "LICENSE")).read()
    assert licence.startswith("MIT License") and "Copyright (c)" in licence
    assert "- **Licence**: MIT ([LICENSE](LICENSE))" in open(PAGES[0]).read()


def test_the_setup_gives_the_install_alone_first_with_its_size():
    """The two commands chain the install into the main job; a newcomer reads the install alone before them."""
    text = open(PAGES[0]).read()
    section = text[text.index("## Set-up and the two commands"):]
    before_block, block = section.split("```")[0], section.split("```")[1]
    install = re.search(r"The install alone, from this folder, is `([^`]+)`", " ".join(before_block.split()))[1]
    first_command = block.strip().splitlines()[0]
    assert first_command.startswith(install + " && bash sh/cpu_experiment.sh")
    assert "GB" in before_block and "CPU-only" in before_block


def test_the_readme_is_a_front_page():
    text = open(PAGES[0]).read()
    assert len(text.splitlines()) <= 250 and len(text.split()) <= 2500
