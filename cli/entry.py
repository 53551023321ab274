"""The `alvts` console script: Ctrl-C while the toolkit's libraries import ends in one line, like any other time."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .app import main as run
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)  # what Ctrl-C gives later too (app.Interrupted)
    run()
