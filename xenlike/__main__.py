"""`python -m xenlike` and the `xenlike` command: the CLI, quiet at any Ctrl-C.

The CLI's imports take a moment; a Ctrl-C during them ends the command
with status 130 as a Ctrl-C later does, not with a traceback.
"""

import sys


def run() -> None:
    try:
        from xenlike.tools.cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
