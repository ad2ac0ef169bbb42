"""Export a run for TF Serving and ONNX Runtime: python export.py RUN_DIR --help (the same as keraslm-export)."""

from keraslm.commands.export import run

if __name__ == "__main__":
    run()
