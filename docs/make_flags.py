"""Write docs/flags.md from train.py's parser: every flag with its group, default and help, so the page cannot drift
from the code (tests/test_docs.py fails when they disagree).

    python docs/make_flags.py          # rewrites docs/flags.md
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags.md")


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def default(action):
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    return "–" if action.default is None else f"`{action.default}`"


def flags_page():
    parser = config.build_parser()
    lines = ["# train.py's flags", "",
             "Written by `python docs/make_flags.py` from the parser in `config.py` (`python train.py --help` prints "
             "the same). Every pixel-valued flag is in pixels/255; presets (`--preset NAME`) stand for flag sets: "
             "[iteration.md](iteration.md#presets).", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"## {group.title}", "", "| flag | default | what it does |", "|---|---|---|"]
        lines += [f"| `{', '.join(a.option_strings)}` | {cell(default(a))} | {cell(a.help)} |" for a in actions]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    with open(PAGE, "w") as f:
        f.write(flags_page())
    print(f"wrote {PAGE}")
