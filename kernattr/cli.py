"""Command line interface: ``kernattr <subcommand>``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kernattr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    del sub
    args = parser.parse_args(argv)
    del args
    return 0


if __name__ == "__main__":
    sys.exit(main())
