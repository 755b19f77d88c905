"""The console while a progress bar is drawn: log lines above the bar, never through it, and
no bar at all where no terminal is attached (a log file)."""
import io
import logging
import re
import sys

from engine.logger import setup_logging
from engine.train import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _console_lines(text: str) -> list[str]:
    """What a terminal shows line by line: a carriage return starts the line over."""
    return [re.split(r"\r", line)[-1] for line in text.split("\n")]


def _run(monkeypatch, tmp_path, stream) -> None:
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    log = setup_logging(tmp_path, is_main=True)
    with progress(range(3), "epoch 0", enabled=True) as batches:
        for i in batches:
            log.info("logged at step %d", i)
    for handler in log.handlers:
        handler.flush()


def test_log_lines_are_written_above_the_bar_not_through_it(monkeypatch, tmp_path):
    terminal = Terminal()
    _run(monkeypatch, tmp_path, terminal)
    text = terminal.getvalue()
    assert "epoch 0" in text  # a bar was drawn
    for i in range(3):
        # every log line starts a line of its own: no bar text before it on that line
        starts = [m.start() for m in re.finditer(f"logged at step {i}", text)]
        assert starts, text
        for start in starts:
            line = text[:start].rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
            assert re.fullmatch(r"[\d:]+ detr_sparse INFO: ", line), repr(line)
    assert "logged at step 2" in (tmp_path / "log.txt").read_text()


def test_no_bar_without_a_terminal(monkeypatch, tmp_path):
    redirected = io.StringIO()  # e.g. `> run.log 2>&1`
    _run(monkeypatch, tmp_path, redirected)
    text = redirected.getvalue()
    assert "\r" not in text and "epoch 0" not in text and "it/s" not in text
    assert text.count("logged at step") == 3
