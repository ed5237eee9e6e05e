"""Streaming latency: lstm_fast's LSTM.step, the step of the model frozen (float32, bfloat16, int8)
and LSTMCell against torch.nn.LSTMCell, one layer (input = hidden), per batch, hidden size and
thread count; median of rounds of calls taken in turns. The precision ratios are of frozen steps. Run: .venv/bin/python tools/step_latency.py [--threads 1,2] [--batch 1,4,16,32] [--hidden 128,256,512]"""
import argparse
import statistics
import time

import numpy as np
import torch

import lstm_fast as lf


def per_call_us(fn, calls):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batch", default="1,4,16,32")
    ap.add_argument("--hidden", default="128,256,512")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print("| threads | batch | hidden | lf step us | lf frozen step us | lf LSTMCell us "
          "| torch LSTMCell us | torch / lf step | torch / frozen step "
          "| lf bf16 step us | lf int8 step us | frozen f32 / bf16 | frozen f32 / int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in map(int, args.threads.split(",")):
        torch.set_num_threads(n)
        for H in map(int, args.hidden.split(",")):
            for B in map(int, args.batch.split(",")):
                m = lf.LSTM(H, H, seed=0)
                cell = lf.LSTMCell(H, H, seed=0)
                tcell = torch.nn.LSTMCell(H, H)
                x = np.random.default_rng(0).standard_normal((B, H)).astype(np.float32)
                state = m.zero_state(B)
                hc = (np.zeros((B, H), np.float32), np.zeros((B, H), np.float32))
                xt, thc = torch.from_numpy(x), (torch.zeros(B, H), torch.zeros(B, H))
                calls = max(20, int(2e5 / (H * max(B, 4))))
                f32, bf16, int8 = (m.freeze(precision=p) for p in ("float32", "bfloat16", "int8"))
                runs = {"step": lambda: m.step(x, state), "frozen": lambda: f32.step(x, state),
                        "cell": lambda: cell(x, hc),
                        "torch": lambda: tcell(xt, thc), "bf16": lambda: bf16.step(x, state),
                        "int8": lambda: int8.step(x, state)}
                times = {k: [] for k in runs}
                with lf.threads(n), torch.inference_mode():
                    for fn in runs.values():
                        for _ in range(10):
                            fn()
                    for _ in range(args.rounds):
                        for k, fn in runs.items():
                            times[k].append(per_call_us(fn, calls))
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"| {n} | {B} | {H} | {med['step']:.1f} | {med['frozen']:.1f} | {med['cell']:.1f} "
                      f"| {med['torch']:.1f} | {med['torch'] / med['step']:.2f}x "
                      f"| {med['torch'] / med['frozen']:.2f}x | {med['bf16']:.1f} | {med['int8']:.1f} "
                      f"| {med['frozen'] / med['bf16']:.2f}x | {med['frozen'] / med['int8']:.2f}x |",
                      flush=True)
    # steps agree with the whole sequence
    x_seq = np.random.default_rng(1).standard_normal((7, 3, 128)).astype(np.float32)
    m2 = lf.LSTM(128, 16, num_layers=2, seed=1)
    st, ys = m2.zero_state(3), []
    for t_ in range(7):
        y, st = m2.step(x_seq[t_], st)
        ys.append(y)
    out, (h, c) = m2(x_seq)
    print("steps vs sequence, max abs:", np.abs(np.stack(ys) - out).max(), np.abs(st[0] - h).max())
    f2 = m2.freeze()   # the frozen model's steps: the sequence kernel's bits (0 where packed)
    st, ys = f2.zero_state(3), []
    for t_ in range(7):
        y, st = f2.step(x_seq[t_], st)
        ys.append(y)
    print("frozen steps vs sequence, max abs:", np.abs(np.stack(ys) - out).max(),
          np.abs(st[0] - h).max())


if __name__ == "__main__":
    main()
