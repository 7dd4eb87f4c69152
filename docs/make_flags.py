"""Write docs/flags.md from train.py's parser (every flag with its group, default and help) and the presets table of
docs/iteration.md from methods.PRESETS, so the pages cannot drift from the code (tests/test_docs.py fails when they
disagree).

    python docs/make_flags.py          # rewrites docs/flags.md and docs/iteration.md's presets table
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import methods  # noqa: E402

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flags.md")
PRESETS_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iteration.md")
PRESETS_BEGIN = "<!-- presets table: written by docs/make_flags.py from methods.PRESETS -->"
PRESETS_END = "<!-- end of the presets table -->"


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


def presets_table():
    """The presets as a markdown table; a preset that extends FGSM's flags shows as `fgsm` + the rest."""
    rows = ["| preset | flags | method |", "|---|---|---|"]
    for name, preset in methods.PRESETS.items():
        rest = preset.flags.removeprefix(methods.FGSM + " ")
        flags = f"`fgsm` + `{rest}`" if rest != preset.flags and name != "fgsm" else f"`{preset.flags}`"
        rows.append(f"| `{name}` | {flags} | {preset.what} |")
    return "\n".join(rows)


def presets_page():
    """docs/iteration.md with its presets table (between the two markers) written anew."""
    text = open(PRESETS_PAGE).read()
    head, rest = text.split(PRESETS_BEGIN)
    return f"{head}{PRESETS_BEGIN}\n{presets_table()}\n{PRESETS_END}{rest.split(PRESETS_END)[1]}"


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False).parse_args(argv)  # --help
    for path, text in ((PAGE, flags_page()), (PRESETS_PAGE, presets_page())):
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
