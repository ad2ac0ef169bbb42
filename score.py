"""Score a model on a text: python score.py MODEL --help (the same as keraslm-score)."""

from keraslm.commands.score import run

if __name__ == "__main__":
    run()
