"""The `xenlike` command line: thin commands that parse, call the library, print."""

import click

from xenlike import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xenlike")
def main() -> None:
    """Run and inspect a Xen-style paravirtualized topology.

    \b
    Example:
        xenlike --version
    """
