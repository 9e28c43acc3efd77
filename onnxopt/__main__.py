"""`python -m onnxopt` runs the command line."""

import sys

from onnxopt.cli import main

sys.exit(main())
