"""The generated pages of docs/: the CLI reference (from --help) and the XenBus diagram.

python -m xenlike._docs        # rewrite them
python -m xenlike._docs --check  # exit 1 if they are out of date (tests/test_docs.py)
"""

import argparse
import sys
from pathlib import Path

import click

from xenlike.tools.cli import main as cli
from xenlike.xenbus.diagram import page as xenbus_page

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _commands(group: click.Group, prefix: list[str]) -> list[tuple[list[str], click.Command]]:
    found: list[tuple[list[str], click.Command]] = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        found.append(([*prefix, name], command))
        if isinstance(command, click.Group):
            found += _commands(command, [*prefix, name])
    return found


def cli_reference() -> str:
    """Every command's --help, in order, as the CLI prints it."""
    parts = [
        "# Command-line reference",
        "",
        "Generated from `--help` by `python -m xenlike._docs`; do not edit by hand.",
        "",
    ]
    for path, command in [([], cli), *_commands(cli, [])]:
        name = " ".join(["xenlike", *path])
        with click.Context(
            command, info_name=name, terminal_width=100, max_content_width=100
        ) as ctx:
            text = command.get_help(ctx)
        parts += [f"## `{name}`", "", "```text", text, "```", ""]
    return "\n".join(parts)


PAGES = {"cli.md": cli_reference, "xenbus-states.md": xenbus_page}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for name, render in PAGES.items():
        path, text = DOCS / name, render()
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run `python -m xenlike._docs`)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
