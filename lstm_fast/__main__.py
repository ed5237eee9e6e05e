"""Command line: `python -m lstm_fast {demo,info}`."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lstm_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the library's main job end to end and print its speed")
    demo.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke test")
    sub.add_parser("info", help="version, build flags, OpenMP, threads, BLAS, CPU (for bug reports)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        return run(quick=args.quick)
    if args.command == "info":
        from ._config import show_config

        show_config()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
