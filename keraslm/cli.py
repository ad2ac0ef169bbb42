"""What the three scripts share: one-line errors with exit code 2, clean interrupts, quiet TF logs."""

import argparse
import os
import signal
import sys

from keraslm.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit code 2), not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_interrupted = False


def _interrupt(signum, frame):
    global _interrupted
    # Remembered as well as raised: a KeyboardInterrupt that lands in a finalizer (a TensorFlow
    # object's __del__ during garbage collection) is printed as "Exception ignored" and lost, and
    # training would go on; training's InterruptCheck raises it again at the next batch.
    _interrupted = True
    raise KeyboardInterrupt


def interrupted():
    """Whether Ctrl-C or SIGTERM has arrived since the script started."""
    return _interrupted


def run_main(main, argv=None):
    """Run `main(argv)`; a UsageError prints one line and exits 2, Ctrl-C or SIGTERM exits 130."""
    # TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the output users came for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # SIGTERM (docker stop, kill, a scheduler's preemption) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    prog = os.path.basename(sys.argv[0])
    try:
        main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"\n{prog}: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
