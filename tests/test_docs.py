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


def test_the_readme_is_a_front_page():
    text = open(PAGES[0]).read()
    assert len(text.splitlines()) <= 250 and len(text.split()) <= 2500
