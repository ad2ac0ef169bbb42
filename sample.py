"""Generate text from an exported model or a run: python sample.py MODEL --help (the same as keraslm-sample)."""

from keraslm.commands.sample import run

if __name__ == "__main__":
    run()
