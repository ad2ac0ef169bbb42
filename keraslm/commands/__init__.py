"""The command lines of keraslm-train, keraslm-export and keraslm-sample (and of train.py, export.py
and sample.py): each module parses its flags, calls the package and prints; `run()` is the entry point."""
