"""The `fastdiff` command line (placeholder until the demo model lands): `fastdiff info`."""
from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    from .info import report
    print(report())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description="fast diffusion sampling")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are available and why").set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
