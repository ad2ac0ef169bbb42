"""A progress line for long work over a corpus: bytes read and tokens made, and their rates.

On a terminal the line is redrawn in place; in a log (stderr not a terminal) a line is printed
every `LOG_EVERY` seconds once the work has lasted that long, so short work prints nothing.
"""

import sys
import time

REDRAW_EVERY = 0.2  # seconds between redraws on a terminal
LOG_EVERY = 10.0  # seconds between lines in a log


class Progress:
    """Bytes and tokens of the current phase, reported on `stream` (stderr).

    Args:
        stream: where the line goes; None: nowhere.

    Example:
        progress = Progress()
        progress.phase("encoding", total_bytes=os.path.getsize(path))
        progress.advance(nbytes=len(chunk), tokens=len(ids))
        progress.close()
    """

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.terminal = bool(stream) and stream.isatty()
        self.started = self.shown = time.monotonic()
        self.drawn = False
        self.phase("")

    def phase(self, name, total_bytes=None):
        """Start counting a new phase (hashing, encoding …) of `total_bytes`, if known."""
        self.name, self.total = name, total_bytes
        self.nbytes = self.tokens = 0
        self.phase_started = time.monotonic()

    def advance(self, nbytes=0, tokens=0):
        """Count `nbytes` more read and `tokens` more made; report if it is time."""
        self.nbytes += nbytes
        self.tokens += tokens
        now = time.monotonic()
        if self.terminal and now - self.shown >= REDRAW_EVERY:
            self._show(now)
        elif self.stream and not self.terminal and now - self.shown >= LOG_EVERY:
            self._show(now)

    def close(self):
        """Erase the line drawn on a terminal (the work's own summary follows)."""
        if self.drawn and self.terminal:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.drawn = False

    def _show(self, now):
        self.shown = now
        self.drawn = True
        # On a terminal: back to the line's start, the line, and erase what a longer line left.
        self.stream.write(f"\r{self.line(now)}\x1b[K" if self.terminal else self.line(now) + "\n")
        self.stream.flush()

    def line(self, now=None):
        """The progress line: phase, MB read (of the total), MB/s, tokens and tokens/s."""
        seconds = max((now or time.monotonic()) - self.phase_started, 1e-9)
        megabytes = self.nbytes / 1e6
        done = f"{megabytes:,.1f}"
        if self.total:
            done += f"/{self.total / 1e6:,.1f} MB ({100 * self.nbytes / self.total:.0f}%)"
        else:
            done += " MB"
        text = f"token cache: {self.name} {done}, {megabytes / seconds:,.1f} MB/s"
        if self.tokens:
            text += f", {self.tokens / 1e6:,.1f} M tokens ({self.tokens / 1e6 / seconds:,.1f} M/s)"
        return text
