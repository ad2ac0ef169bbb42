"""Train a stateful RNN language model: python train.py --help (the same as keraslm-train)."""

from keraslm.commands.train import run

if __name__ == "__main__":
    run()
