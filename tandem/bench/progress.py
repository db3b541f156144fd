"""Whether a long command (`tandem bench ...`, `tandem eval`) draws a progress bar.

The bar is for a person watching a terminal. It goes to stderr (tqdm's default), so stdout
keeps its contract: the human table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (one is drawn on stderr when stdout is a terminal)")


def show_progress(no_progress: bool, stdout: TextIO | None = None) -> bool:
    """True when stdout (`sys.stdout` unless given) is a terminal and --no-progress is off:
    output piped or redirected to a file, as in CI and tests, gets no bar."""
    stream = sys.stdout if stdout is None else stdout
    return not no_progress and stream.isatty()
