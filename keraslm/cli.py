"""What the three scripts share: one-line errors with exit code 2 that name flags, clean interrupts,
quiet TF logs."""

import argparse
import os
import signal
import sys

from keraslm.errors import ArgumentError, UsageError

# Library arguments whose flag is not `--` and the name with dashes (DataConfig.source is --data,
# train()'s token_cache_dir --token-cache).
FLAGS = {"source": "--data", "token_cache_dir": "--token-cache"}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (and exit code 2), not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag(name):
    """The command-line flag of a library argument: `--` + the name with dashes, unless FLAGS says otherwise."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def message(error):
    """A UsageError as the command line words it: the arguments it names are spelled as flags."""
    return error.worded(flag) if isinstance(error, ArgumentError) else str(error)


_interrupted = False


def _interrupt(signum, frame):
    global _interrupted
    if _interrupted:
        return  # once is enough: a second signal must not break the clean exit the first started
    # Remembered as well as raised: a KeyboardInterrupt that lands in a finalizer (a TensorFlow
    # object's __del__ during garbage collection) is printed as "Exception ignored" and lost, and
    # training would go on; training's InterruptCheck raises it again at the next batch.
    _interrupted = True
    raise KeyboardInterrupt


def interrupted():
    """Whether Ctrl-C or SIGTERM has arrived since the script started."""
    return _interrupted


def run_main(main, argv=None):
    """Run `main(argv)`; a UsageError prints one line (its arguments named as flags) and exits 2,
    Ctrl-C or SIGTERM exits 130.

    A reader that stops early (`| head`) ends the command quietly with 141, as it ends `cat`.
    """
    # TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) hides the output users came for.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # SIGTERM (docker stop, kill, a scheduler's preemption) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    prog = os.path.basename(sys.argv[0])
    try:
        main(argv)
    except UsageError as e:
        _exit(2, f"{prog}: error: {message(e)}")
    except KeyboardInterrupt as e:
        _exit(130, f"\n{prog}: {str(e) or 'interrupted'}")
    except MemoryError:
        _exit(2, f"{prog}: error: out of memory; ask for less (fewer or shorter samples, a smaller batch)")
    except BrokenPipeError:
        # The interpreter would flush stdout again at exit and fail once more: point it at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit(141)


def _exit(code, message=None):
    # Ignored, not default: a second Ctrl-C or SIGTERM while the interpreter shuts down (which
    # can take TensorFlow seconds) would otherwise kill it with 143 and a half-printed line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if message:
        print(message, file=sys.stderr)
    sys.exit(code)
