"""`python -m onnxopt` runs the command line."""

import sys

from onnxopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
