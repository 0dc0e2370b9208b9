"""Local training draws a progress bar only where a person watches it."""

import io

import pytest

from fedlowrank.training import show_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, env, shown", [
    (Terminal(), {}, True),  # a terminal
    (io.StringIO(), {}, False),  # a log file or CI
    (Terminal(), {"FEDLOWRANK_PROGRESS": "0"}, False),  # turned off
    (io.StringIO(), {"FEDLOWRANK_PROGRESS": "1"}, True),  # forced on
    (Terminal(), {"FEDLOWRANK_PROGRESS": "yes"}, True),  # other values leave the terminal test
    (object(), {}, False),  # no isatty at all
])
def test_progress_bar_shows_on_a_terminal_unless_the_environment_says_otherwise(stream, env, shown):
    assert show_progress(stream, env) is shown


def test_a_closed_stream_is_not_a_terminal():
    stream = io.StringIO()
    stream.close()
    assert show_progress(stream, {}) is False
