"""Accuracy of the reduced precisions against float32 (docs/precision.md): max abs error of out,
h_n and c_n for lstm_fast's bfloat16 and int8 and torch's bfloat16 module (module.to(bfloat16))
on the same torch-initialised weights and N(0, 1) inputs.

    python tools/precision_accuracy.py            # the table of docs/precision.md
"""
import sys

import numpy as np

import lstm_fast as lf
from lstm_fast._precision import path_for

SHAPES = [  # T, B, I, H, layers, bidirectional, proj
    (100, 1, 128, 128, 1, False, 0),
    (100, 16, 128, 128, 1, True, 0),
    (50, 64, 512, 512, 1, False, 0),
    (25, 128, 1024, 1024, 1, False, 0),
    (100, 8, 64, 96, 2, False, 32),
    (1000, 4, 32, 64, 1, False, 0),
]


def errors(outs, ref):
    return [float(np.abs(np.asarray(a, np.float64) - r).max()) for a, r in zip(outs, ref)]


def main():
    import torch

    torch.manual_seed(0)
    print(f"paths: bfloat16 {path_for('bfloat16')}, int8 {path_for('int8')}")
    print("| T, B, I, H, layers, bidir, proj | lf bfloat16 (out / h_n / c_n) | torch bf16 module "
          "| lf int8 |")
    print("|---|---|---|---|")
    for T, B, I, H, L, bi, proj in SHAPES:
        t = torch.nn.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=proj).eval()
        m = lf.LSTM.from_torch(t)
        x = np.random.default_rng(T + B).standard_normal((T, B, I)).astype(np.float32)
        out, (h, c) = m(x)
        ref = [np.asarray(a, np.float64) for a in (out, h, c)]
        cells = []
        for precision in ("bfloat16", "int8"):
            o, (hh, cc) = m.freeze(precision=precision)(x)
            cells.append(errors((o, hh, cc), ref))
        with torch.inference_mode():
            tb = t.to(torch.bfloat16)
            o, (hh, cc) = tb(torch.from_numpy(x).bfloat16())
            cells.insert(1, errors([a.float().numpy() for a in (o, hh, cc)], ref))
        fmt = lambda e: " / ".join(f"{v:.1e}" for v in e)   # noqa: E731
        print(f"| {T}, {B}, {I}, {H}, {L}, {'yes' if bi else 'no'}, {proj} | "
              + " | ".join(fmt(e) for e in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
