"""The `headrace` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(prog="headrace", description="headrace task queue engine")
    parser.add_argument("--version", action="version", version=f"headrace {__version__}")
    parser.parse_args(argv)
    print(f"headrace {__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
