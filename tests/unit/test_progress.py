"""The progress-bar decision shared by `tandem bench` and `tandem eval`: a bar only when
stdout is a terminal and --no-progress is off (tandem/bench/progress.py)."""

from __future__ import annotations

import io

import pytest

from tandem.bench.progress import show_progress
from tandem.cli import build_parser


class FakeStream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bar_only_on_a_terminal_without_no_progress():
    assert show_progress(False, FakeStream(tty=True))
    assert not show_progress(True, FakeStream(tty=True))
    assert not show_progress(False, FakeStream(tty=False))
    assert not show_progress(False, io.StringIO())


@pytest.mark.parametrize("argv", [["bench", "latency"], ["bench", "prefill"],
                                  ["bench", "throughput"], ["eval", "x.py"]])
def test_every_long_command_takes_no_progress(argv):
    assert build_parser().parse_args(argv).no_progress is False
    assert build_parser().parse_args(argv + ["--no-progress"]).no_progress is True
