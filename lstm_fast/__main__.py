"""Command line: `python -m lstm_fast {demo,info,bench}`."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lstm_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the library's main job end to end and print its speed")
    demo.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke test")
    sub.add_parser("info", help="version, build flags, OpenMP, threads, BLAS, CPU (for bug reports)")
    bench = sub.add_parser("bench", help="speed on the benchmark grid, side by side with the peers")
    bench.add_argument("--compare", action="store_true", help="also run torch and ONNX Runtime")
    bench.add_argument("--quick", action="store_true", help="three shapes, few repeats (smoke test)")
    bench.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved rounds per shape")
    bench.add_argument("--out", default="bench.md", help="Markdown table to write")
    bench.add_argument("--plot", default="bench.png", help="PNG plot to write (needs matplotlib)")
    bench.add_argument("--blas", action="store_true",
                       help="also time lstm_fast's BLAS fallback (the generic kernel path)")
    bench.add_argument("--no-peak", action="store_true",
                       help="skip the sgemm peak measurement (numpy float32 matmul 2048^3)")
    bench.add_argument("--rows", default="",
                       help="grid rows to run, comma-separated indices (default: all)")
    bench.add_argument("--train", action="store_true",
                       help="time a training step (forward + backward) against torch autograd instead")
    bench.add_argument("--contended", action="store_true",
                       help="each shape idle and with one core busy (a helper process), default "
                            "threads and one thread, torch beside")
    bench.add_argument("--precision", default="",
                       help="reduced precisions to time (bfloat16,int8) against torch's bfloat16 "
                            "module, autocast, lstm_fast float32 and ONNX Runtime's DynamicQuantizeLSTM")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        return run(quick=args.quick)
    if args.command == "bench":
        from ._bench import run

        if args.contended:
            from ._bench import run_contended

            run_contended(quick=args.quick, repeats=args.repeats,
                          out_md=args.out if args.out != "bench.md" else None)
            return 0
        counts = tuple(int(t) for t in args.threads.split(","))
        from ._bench import GRID

        try:
            grid = [GRID[int(i)] for i in args.rows.split(",")] if args.rows else None
        except (ValueError, IndexError):
            parser.error(f"--rows takes indices 0..{len(GRID) - 1} of the grid, got {args.rows!r}")
        if args.train:
            from ._bench import run_training

            run_training(thread_counts=counts, repeats=args.repeats, quick=args.quick, grid=grid)
            return 0
        if args.precision:
            from ._bench import run_precision
            from ._precision import REDUCED

            precisions = tuple(p.strip() for p in args.precision.split(","))
            bad = [p for p in precisions if p not in REDUCED]
            if bad:
                parser.error(f"--precision takes {', '.join(REDUCED)}, got {', '.join(bad)}")
            out = args.out if args.out != "bench.md" else "bench_precision.md"
            run_precision(precisions, thread_counts=counts, repeats=args.repeats, grid=grid,
                          quick=args.quick, out_md=out)
            return 0
        run(compare=args.compare, quick=args.quick, thread_counts=counts, repeats=args.repeats,
            out_md=args.out, out_png=args.plot, blas=args.blas, peak=not args.no_peak, grid=grid)
        return 0
    if args.command == "info":
        from ._config import show_config

        show_config()
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
