"""Reduced-precision inference (issue 16): freeze(precision="bfloat16" | "int8").

Against a numpy emulation of the documented quantization (int8 bitwise, bfloat16 within a
tolerance), the float32 model, torch's bfloat16 module; every inference feature; each kernel path
(forced in-process and through LSTM_FAST_ISA in a subprocess); 1 vs 2 threads bit for bit; files
and pickling; bad input.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import lstm_fast as lf
from lstm_fast import _lowp, _precision

torch = pytest.importorskip("torch")

REDUCED = ("bfloat16", "int8")
FEAT = _lowp.cpu_features()
# every path this CPU runs, per precision (amx_emulated: the AMX tile logic over emulated tiles)
PATHS = {
    "bfloat16": ["generic", "amx_emulated"] + (["avx512_bf16"] if FEAT["avx512_bf16"] else [])
    + (["avx512_fma"] if FEAT["avx512_fma"] else []) + (["avx2_fma"] if FEAT["avx2_fma"] else [])
    + (["amx"] if FEAT["amx_granted"] else []),
    "int8": ["generic", "amx_emulated"] + (["avx512_vnni"] if FEAT["avx512_vnni"] else [])
    + (["avx2"] if FEAT["avx2"] else [])
    + (["amx"] if FEAT["amx_granted"] else []),
}
KERNEL = {"generic": "generic", "amx_emulated": "amx_emulated", "avx512_bf16": "avx512",
          "avx512_vnni": "avx512", "amx": "amx", "avx512_fma": "avx512_fma", "avx2_fma": "avx2_fma",
          "avx2": "avx2"}
# bfloat16 paths that compute VDPBF16PS's chain (odd element first, FTZ): the generic path's bits
SAME_BITS_BF16 = ("avx512_bf16", "avx512_fma", "avx2_fma")


@pytest.fixture
def forced():
    """_force_path(...) for the test, restored afterwards."""
    yield _precision._force_path
    _precision._force_path(None)


# ---------------------------------------------------------------------------- numpy emulation
def bf16(a):
    """float32 -> bfloat16 (as float32 values): nearest-even, subnormals to signed zero, NaN kept."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    sub = (u & 0x7F800000) == 0
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(nan, ((u >> 16) | 0x40) & 0xFFFF, r)
    r = np.where(sub, (u >> 16) & 0x8000, r)
    return (r.astype(np.uint32) << 16).view(np.float32)


def int8_rows(a):
    """Symmetric per-row int8: (q as int64, scale float32 per row), as documented."""
    a = np.asarray(a, dtype=np.float32)
    amax = np.abs(a).max(axis=1)
    bad = ~np.isfinite(amax)
    live = (amax >= np.float32(2.0**-120)) & ~bad     # smaller rows quantize to zeros
    safe = np.where(live, amax, np.float32(1))
    inv = (np.float32(127) / safe).astype(np.float32)
    q = np.clip(np.rint((a * inv[:, None]).astype(np.float32)), -127, 127)
    q = np.where(live[:, None], q, 0).astype(np.int64)
    scale = np.where(live, (amax / np.float32(127)).astype(np.float32), np.float32(0))
    scale = np.where(bad, np.float32(np.nan), scale).astype(np.float32)
    return q, scale


def emu_matmul(precision, a, w):
    """dequant(quant(a) . quant(w)^T): int8 bit for bit; bfloat16 in float64 (the kernels sum in
    float32, so within a few float32 ulps of the sum of |terms|)."""
    if precision == "bfloat16":
        return (bf16(a).astype(np.float64) @ bf16(w).astype(np.float64).T).astype(np.float32)
    qa, sa = int8_rows(a)
    qw, sw = int8_rows(w)
    acc = (qa @ qw.T).astype(np.int32).astype(np.float32)
    return acc * (sa[:, None] * sw[None, :])


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def emu_lstm(model, precision, x, h0=None, c0=None):
    """The documented reduced-precision LSTM in numpy: x (T, B, I) time-major, full lengths."""
    sd = model.state_dict()
    T, B, _ = x.shape
    L, D, H, Ho = model.num_layers, model.num_directions, model.hidden_size, model.hidden_out
    h_n = np.zeros((L * D, B, Ho), np.float32) if h0 is None else h0.astype(np.float32).copy()
    c_n = np.zeros((L * D, B, H), np.float32) if c0 is None else c0.astype(np.float32).copy()
    inp = x.astype(np.float32)
    for k in range(L):
        y = np.zeros((T, B, D * Ho), np.float32)
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            w_ih, w_hh = sd["weight_ih" + sfx], sd["weight_hh" + sfx]
            b = (sd["bias_ih" + sfx] + sd["bias_hh" + sfx]) if model.bias else np.zeros(4 * H, np.float32)
            h, c = h_n[k * D + d].copy(), c_n[k * D + d].astype(np.float64)
            gx = emu_matmul(precision, inp.reshape(T * B, -1), w_ih).reshape(T, B, 4 * H)
            for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                z = (emu_matmul(precision, h, w_hh).astype(np.float64) + gx[t] + b)
                i, f, g, o = np.split(z, 4, axis=1)
                c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
                hr = (sigmoid(o) * np.tanh(c)).astype(np.float32)
                h = emu_matmul(precision, hr, sd["weight_hr" + sfx]) if model.proj_size else hr
                y[t, :, d * Ho:(d + 1) * Ho] = h
            h_n[k * D + d], c_n[k * D + d] = h, c
        inp = y
    return inp, (h_n, c_n)


def torch_model(I, H, seed=0, **kw):
    torch.manual_seed(seed)
    t = torch.nn.LSTM(I, H, **kw)
    return t, lf.LSTM.from_torch(t)


def maxerr(a, b):
    return max(float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).max())
               for p, q in zip(a, b))


def flat(res):
    out, (h, c) = res
    return [out, h, c]


# ---------------------------------------------------------------------------- quantization
# the conversions of activations the layers run, per precision: the scalar code, AVX-512 code
# and, for bfloat16 on CPUs with AVX512-BF16, VCVTNEPS2BF16
QUANT_PATHS = {p: [KERNEL[q] for q in PATHS[p] if q not in ("amx_emulated", "amx")] for p in REDUCED}


@pytest.mark.parametrize("precision, path", [(p, q) for p in REDUCED for q in QUANT_PATHS[p]])
def test_quantized_rows_match_the_documented_rounding(precision, path, rng):
    a = rng.standard_normal((9, 37)).astype(np.float32) * np.float32(3)
    a[1] = 0
    a[2, :5] = [1e-39, -1e-40, 0.5, -0.5, 2.5]     # subnormals, ties
    a[3] = np.ldexp(np.float32(1), -126) * 0.75     # all subnormal
    a[4, 3:] = 0                                     # zeros beside a tiny row maximum:
    a[4, :3] = [1e-37, -2e-37, 5e-38]                # 127 / max would overflow
    a[5, :3] = [1e-36, -2e-36, 3e-36]
    a[6, :6] = [np.nan, np.inf, -np.inf, 3.3e38, -3.4e38, -0.0] if precision == "bfloat16" else 0
    q, s = _lowp.quantize_rows(precision, a, path)
    if precision == "bfloat16":
        np.testing.assert_array_equal((q.astype(np.uint32) << 16).view(np.uint32),
                                      bf16(a).view(np.uint32))
        assert ((q.astype(np.uint32) << 16).view(np.float32)[2, :2] == 0).all()
    else:
        want_q, want_s = int8_rows(a)
        np.testing.assert_array_equal(q.astype(np.int64) - 128, want_q)
        np.testing.assert_array_equal(s, want_s)


@pytest.mark.parametrize("path", QUANT_PATHS["bfloat16"])
def test_bf16_rounding_ties_to_even_and_nan(path):
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, np.nan, np.inf, -np.inf, 3.3e38], np.float32)
    q, _ = _lowp.quantize_rows("bfloat16", x[None], path)
    got = (q[0].astype(np.uint32) << 16).view(np.float32)
    assert got[0] == 1.0 and got[1] == 1 + 4 * 2**-8    # ties to even
    assert np.isnan(got[2]) and got[3] == np.inf and got[4] == -np.inf
    assert got[5] == bf16(x)[5]


@pytest.mark.parametrize("path", QUANT_PATHS["bfloat16"])
def test_bf16_conversion_of_every_exponent_and_rounding_case(path):
    # 2^20 float32 bit patterns: every sign and exponent (subnormals, infinities, NaNs with
    # signalling and quiet payloads) with low halves around the rounding point, against the
    # documented rounding (nearest even, subnormals to signed zero, NaN quieted)
    hi = np.arange(1 << 9, dtype=np.uint32) << 23
    lo = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000, 0x17FFF, 0x18000, 0x7FFFFF,
                   0x400000, 0x3F8000, 0x7F8000, 0x12345, 0x2AAAAA, 0x555555], np.uint32)
    mant = (np.arange(128, dtype=np.uint32)[:, None] * 0x10000 + lo[None, :]).ravel() & 0x7FFFFF
    u = (hi[:, None] | mant[None, :]).ravel()
    x = u.view(np.float32).reshape(-1, 64)
    q, _ = _lowp.quantize_rows("bfloat16", x, path)
    np.testing.assert_array_equal((q.astype(np.uint32) << 16).ravel(), bf16(x).view(np.uint32).ravel())
    # and torch's own conversion (nearest even) wherever it agrees with the documented one: normal
    # finite floats (torch keeps subnormals, which the kernels flush, and keeps NaN payloads)
    exponent = (u >> 23) & 0xFF
    normal = (exponent != 0) & (exponent != 0xFF)
    want = torch.from_numpy(u[normal].view(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(q.ravel()[normal], want.view(np.uint16))


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("shape", [(1, 128, 512), (7, 53, 37), (13, 300, 64), (17, 64, 1000)])
def test_products_match_the_numpy_emulation_on_every_path(precision, shape, rng):
    rows, k, n = shape
    w = rng.standard_normal((n, k)).astype(np.float32) * np.float32(0.1)
    a = rng.standard_normal((rows, k)).astype(np.float32)
    packed = _lowp.Packed(precision, w)
    want = emu_matmul(precision, a, w)
    outs = {p: packed.matmul(KERNEL[p], a) for p in PATHS[precision]}
    for path, got in outs.items():
        if precision == "int8":
            np.testing.assert_array_equal(got, want, err_msg=path)   # exact integer sums
        else:
            bound = 4 * k * np.finfo(np.float32).eps * (np.abs(bf16(a)) @ np.abs(bf16(w)).T)
            assert (np.abs(got - want) <= bound + 1e-30).all(), path
    if precision == "bfloat16":
        # the generic path computes VDPBF16PS's chain (odd element first, FTZ), and so do the FMA
        # paths of CPUs without it: the same bits
        for path in SAME_BITS_BF16:
            if path in outs:
                np.testing.assert_array_equal(outs["generic"].view(np.uint32),
                                              outs[path].view(np.uint32), err_msg=path)
    if "amx" in outs:
        # the emulation of TDPBF16PS (even and odd chains per tile) gives the hardware's bits
        np.testing.assert_array_equal(outs["amx"], outs["amx_emulated"])


def random_products(rng, trials, k_max, n_max, underflow=True):
    """(w, a) pairs of random shapes (1-39 rows), inputs over 12 decades; every sixth trial
    scaled so that products underflow."""
    for trial in range(trials):
        rows, k, n = int(rng.integers(1, 40)), int(rng.integers(1, k_max)), int(rng.integers(1, n_max))
        w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
        a = (rng.standard_normal((rows, k)) * np.exp(rng.uniform(-7, 7, (rows, k)))).astype(np.float32)
        if underflow and trial % 6 == 0:
            a *= np.float32(1e-20)
            w *= np.float32(1e-18)
        yield w, a


@pytest.mark.skipif(not FEAT["amx_granted"], reason="no AMX on this CPU")
@pytest.mark.parametrize("precision", REDUCED)
def test_amx_hardware_matches_its_emulation_bit_for_bit(precision, rng):
    """Random shapes (partial tiles of rows, inputs and outputs), magnitudes over 12 decades and
    products that underflow: the real tile instructions against their C emulation."""
    for w, a in random_products(rng, 60, 200, 100):
        packed = _lowp.Packed(precision, w)
        hw, emu = packed.matmul("amx", a), packed.matmul("amx_emulated", a)
        np.testing.assert_array_equal(hw.view(np.uint32), emu.view(np.uint32), err_msg=str((a.shape, w.shape)))


@pytest.mark.skipif(not FEAT["avx512_bf16"], reason="no AVX512-BF16 on this CPU")
def test_amx_one_row_kernel_gives_the_tiles_bits(rng):
    """The AMX path's bfloat16 kernel for one row (batch-1 steps: VDPBF16PS in the tiles' order,
    even and odd chains per 32 inputs), from the standard pack and from its own paired layout,
    bit for bit the emulated tiles on rows of the same product; shapes past 8 blocks (a second
    pass), with inputs that are not a multiple of 32, padded blocks (from 128 inputs) and
    products that underflow. A CPU without AMX runs the kernel only here."""
    shapes = [(w, a) for w, a in random_products(rng, 40, 700, 300)]
    shapes.append((rng.standard_normal((300, 256)).astype(np.float32),
                   rng.standard_normal((3, 256)).astype(np.float32)))
    for w, a in shapes:
        emu = _lowp.Packed("bfloat16", w).matmul("amx_emulated", a)
        for row_order in (False, True):
            packed = _lowp.Packed("bfloat16", w, row_order=row_order)
            got = packed.matmul("amx_row", a)
            np.testing.assert_array_equal(got.view(np.uint32), emu.view(np.uint32),
                                          err_msg=str((a.shape, w.shape, row_order)))
    with pytest.raises(ValueError, match="amx_row"):
        _lowp.Packed("int8", w).matmul("amx_row", a)


@pytest.mark.parametrize("precision", REDUCED)
def test_amx_tile_pairs_give_each_rows_own_bits(precision, rng):
    """The AMX kernel from 32 rows on pairs two row tiles on each weight tile (and stores
    bfloat16 sums of whole blocks straight from the tiles), 16-31 rows take one row tile, the rest
    a tile of fewer rows: every row's outputs are the bits that row gets through the kernel alone
    (one-row tiles), with odd block counts (a pair's second block missing) and a partial last
    block; int8 also against the exact numpy sums. Emulated tiles: on any CPU."""
    for rows, k, n in ((32, 64, 32), (33, 100, 48), (47, 64, 40), (64, 130, 16), (80, 257, 70),
                       (31, 64, 64), (17, 40, 24)):
        w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
        a = (rng.standard_normal((rows, k)) * np.exp(rng.uniform(-3, 3, (rows, k)))).astype(np.float32)
        packed = _lowp.Packed(precision, w)
        got = packed.matmul("amx_emulated", a)
        alone = np.concatenate([packed.matmul("amx_emulated", a[r:r + 1]) for r in range(rows)])
        np.testing.assert_array_equal(got.view(np.uint32), alone.view(np.uint32),
                                      err_msg=str((rows, k, n)))
        if precision == "int8":
            np.testing.assert_array_equal(got, emu_matmul(precision, a, w), err_msg=str((rows, k, n)))


@pytest.mark.parametrize("precision", REDUCED)
def test_amx_layer_rows_as_if_alone_on_one_and_two_threads(precision, forced, rows_bound, rng):
    """The AMX path's layer (emulated tiles): 70 rows with lengths, so that a phase's products
    change their tile rows from step to step (pairs, one tile, fewer rows) and the tiles are
    configured again in the middle of a phase; split by rows (32 or more a thread) or by gate
    columns (rows bound 0), on one thread and two: every sequence gets the bits it gets alone,
    and int8 the generic path's bits."""
    forced("amx_emulated")
    _, m = torch_model(20, 30, bidirectional=True, proj_size=12)
    f = m.freeze(precision=precision)
    assert f.kernel_path == "amx_emulated"
    x = rng.standard_normal((6, 70, 20)).astype(np.float32)
    lengths = rng.integers(1, 7, size=70)
    lengths[:40] = 6
    lengths[40:55] = 4
    alone = [flat(f(x[:n, b:b + 1])) for b, n in enumerate(lengths)]
    for bound in (1 << 30, 0):
        rows_bound(bound)
        for threads in (1, 2):
            with lf.threads(threads):
                out, (h, c) = f(x, lengths=lengths)
            for b, n in enumerate(lengths):
                o1, h1, c1 = alone[b]
                np.testing.assert_array_equal(out[:n, b:b + 1], o1, err_msg=str((bound, threads, b)))
                np.testing.assert_array_equal(h[:, b:b + 1], h1)
                np.testing.assert_array_equal(c[:, b:b + 1], c1)
    if precision == "int8":
        forced("generic")
        want = flat(m.freeze(precision=precision)(x, lengths=lengths))
        for a, b in zip(want, [out, h, c]):
            np.testing.assert_array_equal(a, b)


def test_amx_bfloat16_models_pack_the_one_row_layout(forced):
    # only the AMX path's bfloat16 packs carry the one-row layout (as much memory again)
    _, m = torch_model(20, 24, num_layers=2, proj_size=8)
    for path, precision, want in (("amx", "bfloat16", True), ("amx", "int8", False),
                                  ("amx_emulated", "bfloat16", False), ("generic", "bfloat16", False)):
        forced(path)
        f = m.freeze(precision=precision)
        packs = [pk for ih, hh, hr, _ in f._lowp for pk in ih + hh + (hr or [])]
        assert [pk.row_data is not None for pk in packs] == [want] * len(packs), (path, precision)
        if want:
            assert all(pk.row_data.nbytes == pk.nbytes for pk in packs)
    forced(None)


@pytest.mark.parametrize("path", [p for p in ("avx512_fma", "avx2_fma") if FEAT[p]])
def test_fma_paths_give_the_generic_bits(path, rng):
    """bfloat16 on CPUs without VDPBF16PS: random shapes (partial row tiles, blocks and input
    chunks), magnitudes over 12 decades and products that underflow, bit for bit the generic
    path; and the caller's flush-to-zero setting is left as it was."""
    for w, a in random_products(rng, 60, 700, 300):
        packed = _lowp.Packed("bfloat16", w)
        got, want = packed.matmul(path, a), packed.matmul("generic", a)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str((a.shape, w.shape)))
    # 1-3 rows (and 13-15: the same after a 12-row tile) over whole and partial blocks and two
    # input chunks: the wide few-row tiles (1 x 8, 2-3 x 4 blocks; 1 x 4, 2 x 2 on AVX2)
    for rows in (1, 2, 3, 4, 13, 14, 15):
        for n in (64, 16 * 9 + 5, 16 * 11):
            w = (rng.standard_normal((n, 300)) * 0.1).astype(np.float32)
            a = rng.standard_normal((rows, 300)).astype(np.float32)
            packed = _lowp.Packed("bfloat16", w)
            got, want = packed.matmul(path, a), packed.matmul("generic", a)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str((rows, n)))
    tiny = np.float32(1e-38) * np.float32(np.random.default_rng(0).uniform(0.25, 0.5))
    assert 0 < tiny < np.finfo(np.float32).tiny      # still subnormal: MXCSR restored


@pytest.mark.skipif(not FEAT["avx2"], reason="no AVX2 on this CPU")
def test_int8_avx2_path_gives_the_exact_sums(rng):
    """int8 on CPUs without VPDPBUSD (VPMADDWD on int16): random shapes (partial row tiles and
    half blocks), rows with NaN and all-zero rows, bit for bit the generic path."""
    for trial, (w, a) in enumerate(random_products(rng, 60, 700, 300, underflow=False)):
        if trial % 5 == 0:
            a[0] = 0.0
            a[-1, 0] = np.nan
        packed = _lowp.Packed("int8", w)
        got, want = packed.matmul("avx2", a), packed.matmul("generic", a)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str((a.shape, w.shape)))
    # inputs over several widened chunks (1024 a chunk: partial sums wait in the output between
    # them), 1-5 rows, a partial last block
    for rows, k in [(1, 2100), (3, 1024), (5, 1025), (2, 3000)]:
        w = rng.standard_normal((37, k)).astype(np.float32)
        a = rng.standard_normal((rows, k)).astype(np.float32)
        a[-1, k // 2] = 40.0                     # one large input: the rest quantize small
        packed = _lowp.Packed("int8", w)
        got, want = packed.matmul("avx2", a), packed.matmul("generic", a)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str((rows, k)))


def test_int8_row_with_nan_gives_nan_outputs_only_there(rng):
    w = rng.standard_normal((20, 8)).astype(np.float32)
    a = rng.standard_normal((3, 8)).astype(np.float32)
    a[1, 2] = np.nan
    out = _lowp.Packed("int8", w).matmul("generic", a)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("k", [20, 255, 256, 300, 1024])
def test_graph_integers_pack_as_the_float_weights_do(k, rng):
    """Packed(q=, q_scale=) (DynamicQuantizeLSTM's integers) lays its blocks out as lf_lp_pack
    does, including the cache line between blocks from 4 KiB (k >= 256 int8): the same bytes
    and the same products as packing the float weights they came from."""
    w = rng.standard_normal((40, k)).astype(np.float32)
    q, scale = int8_rows(w)
    from_float, from_q = _lowp.Packed("int8", w), _lowp.Packed("int8", None, q=q, q_scale=scale)
    np.testing.assert_array_equal(from_float.data, from_q.data)
    np.testing.assert_array_equal(from_float.scale, from_q.scale)
    a = rng.standard_normal((5, k)).astype(np.float32)
    for path in PATHS["int8"]:
        np.testing.assert_array_equal(from_q.matmul(KERNEL[path], a), emu_matmul("int8", a, w), err_msg=path)


def test_packed_weights_start_on_a_cache_line(rng):
    # the kernels load the packed weights 64 bytes at a time; numpy alone aligns to 16 bytes, and
    # a misaligned pack split every load over two lines (0.28 against 0.40-0.51 ms by process)
    packs = [_lowp.Packed(p, rng.standard_normal((n, k)).astype(np.float32))
             for p in REDUCED for n, k in [(16, 4), (20, 8), (512, 128), (64, 33), (8, 300)]]
    q = rng.integers(-128, 128, size=(48, 20))
    packs += [_lowp.Packed("int8", None, q=q, q_scale=np.ones(48, np.float32)) for _ in range(4)]
    for pk in packs:
        assert pk.data.ctypes.data % 64 == 0, (pk.precision, pk.shape)
        assert pk.data.nbytes == pk.nbytes and not pk.data.flags.writeable


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 5},
                                {"bias": False}], ids=["plain", "2layer-bidir", "proj", "nobias"])
def test_model_matches_the_numpy_emulation(precision, kw, rng):
    _, m = torch_model(6, 12, **kw)
    x = rng.standard_normal((9, 4, 6)).astype(np.float32)
    D = m.num_directions
    h0 = rng.standard_normal((m.num_layers * D, 4, m.hidden_out)).astype(np.float32) * 0.5
    c0 = rng.standard_normal((m.num_layers * D, 4, 12)).astype(np.float32) * 0.5
    got = m.freeze(precision=precision)(x, (h0, c0))
    want = emu_lstm(m, precision, x, h0, c0)
    # the kernels' float32 cell vs numpy's float64 one: ~1e-7, except where that moves an int8
    # activation across a rounding boundary (one quantum of one input: ~1e-3 at most here)
    assert maxerr(flat(got), flat(want)) < (2e-3 if precision == "int8" else 1e-4)


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"bidirectional": True}, {"proj_size": 16}],
                         ids=["plain", "2layer", "bidir", "proj"])
@pytest.mark.parametrize("shape", [(20, 8, 32, 64), (50, 1, 16, 40)])
def test_bfloat16_no_worse_than_torch_bfloat16_module(kw, shape):
    T, B, I, H = shape
    t, m = torch_model(I, H, seed=3, **kw)
    x = np.random.default_rng(3).standard_normal((T, B, I)).astype(np.float32)
    ref = flat(m(x))
    ours = maxerr(flat(m.freeze(precision="bfloat16")(x)), ref)
    tb = t.to(torch.bfloat16)
    with torch.no_grad():
        o, (h, c) = tb(torch.from_numpy(x).bfloat16())
    theirs = maxerr([o.float().numpy(), h.float().numpy(), c.float().numpy()], ref)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True}, {"proj_size": 32}],
                         ids=["plain", "2layer-bidir", "proj"])
@pytest.mark.parametrize("shape", [(30, 8, 64, 128), (100, 1, 128, 128), (10, 32, 256, 256)])
def test_int8_within_2e_2_of_float32(kw, shape):
    T, B, I, H = shape
    _, m = torch_model(I, H, seed=1, **kw)
    x = np.random.default_rng(1).standard_normal((T, B, I)).astype(np.float32)
    assert maxerr(flat(m.freeze(precision="int8")(x)), flat(m(x))) < 2e-2


@pytest.mark.parametrize("precision,bound", [("bfloat16", 2e-2), ("int8", 2e-2)])
def test_long_sequences_do_not_accumulate_error(precision, bound):
    """T = 1000: the error of the states settles (the forget gate damps it) instead of growing."""
    _, m = torch_model(32, 64, seed=2)
    x = np.random.default_rng(2).standard_normal((1000, 4, 32)).astype(np.float32)
    ref_out, (ref_h, ref_c) = m(x)
    out, (h, c) = m.freeze(precision=precision)(x)
    err = np.abs(out - ref_out).max(axis=(1, 2))
    assert err.max() < bound
    assert err[500:].max() < 2 * err[:500].max() + 1e-3    # no growth over the second half
    assert maxerr([h, c], [ref_h, ref_c]) < bound


# ---------------------------------------------------------------------------- features
@pytest.mark.parametrize("precision", REDUCED)
def test_lengths_each_sequence_as_if_alone(precision, rng):
    """Per-row activation scales: a sequence's result does not depend on the rest of the batch,
    its padding or its position in it (bit for bit), in both directions."""
    _, m = torch_model(5, 16, num_layers=2, bidirectional=True)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((8, 4, 5)).astype(np.float32)
    lengths = [8, 3, 5, 1]
    out, (h, c) = f(x, lengths=lengths)
    for b, n in enumerate(lengths):
        o1, (h1, c1) = f(x[:n, b:b + 1])
        np.testing.assert_array_equal(out[:n, b:b + 1], o1)
        assert not out[n:, b].any()
        np.testing.assert_array_equal(h[:, b:b + 1], h1)
        np.testing.assert_array_equal(c[:, b:b + 1], c1)


@pytest.mark.parametrize("precision", REDUCED)
def test_layouts_initial_states_unbatched(precision, rng):
    _, m = torch_model(5, 8, num_layers=2, proj_size=3)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((6, 3, 5)).astype(np.float32)
    h0 = rng.standard_normal((2, 3, 3)).astype(np.float32)
    c0 = rng.standard_normal((2, 3, 8)).astype(np.float32)
    out, (h, c) = f(x, (h0, c0))
    assert out.dtype == np.float32 and out.shape == (6, 3, 3)
    assert maxerr([out, h, c], flat(m(x, (h0, c0)))) < 3e-2
    fb = lf.LSTM.from_torch(torch.nn.LSTM(5, 8, num_layers=2, proj_size=3, batch_first=True))
    fb.load_state_dict(m.state_dict())
    ob, (hb, cb) = fb.freeze(precision=precision)(x.transpose(1, 0, 2), (h0, c0))
    np.testing.assert_array_equal(ob, out.transpose(1, 0, 2))
    np.testing.assert_array_equal(hb, h)
    ou, (hu, cu) = f(x[:, 1], (h0[:, 1], c0[:, 1]))    # unbatched
    np.testing.assert_array_equal(ou, out[:, 1])
    np.testing.assert_array_equal(cu, c[:, 1])
    o64, _ = f(x.astype(np.float64), (h0, c0))        # float64 input: converted, like m
    np.testing.assert_array_equal(o64, out)


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("layers, proj, batch, threads", [(2, 6, 3, 1), (3, 0, 70, 1), (3, 0, 70, 2),
                                                          (1, 0, 1, 2)])
def test_step_gives_the_sequence_bits(precision, layers, proj, batch, threads, rng):
    # three layers: the step plan passes each layer's output to the next through two buffers
    # in turn; batch 70 takes the layer's row split, two threads the split recurrence
    _, m = torch_model(5, 24 if proj else 40, num_layers=layers, proj_size=proj)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((7, batch, 5)).astype(np.float32)
    with lf.threads(threads):
        out, (h, c) = f(x)
        state = f.zero_state(batch)
        for t in range(7):
            y, state = f.step(x[t], state)
            np.testing.assert_array_equal(y, out[t])
        y1, _ = f.step(x[0, 0], f.zero_state())          # unbatched step
    np.testing.assert_array_equal(state[0], h)
    np.testing.assert_array_equal(state[1], c)
    np.testing.assert_array_equal(y1, out[0, 0])
    y32, _ = m.step(x[0], m.zero_state(batch))         # the float32 model's within the error
    assert maxerr([out[0]], [y32]) < 3e-2


@pytest.mark.parametrize("precision", REDUCED)
def test_step_plan_after_pickle_and_refreeze_and_bad_shapes(precision, rng):
    _, m = torch_model(6, 32, num_layers=2)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y, _ = f.step(x, f.zero_state(4))                  # makes the step plan
    g = pickle.loads(pickle.dumps(f))
    np.testing.assert_array_equal(g.step(x, g.zero_state(4))[0], y)
    other = "int8" if precision == "bfloat16" else "bfloat16"
    o = f.freeze(precision=other)                      # its own plan, in its own precision
    np.testing.assert_array_equal(o.step(x, o.zero_state(4))[0], m.freeze(precision=other)(x[None])[0][0])
    plan = f._lowp_step
    h, c = (np.zeros((2, 4, 32), np.float32) for _ in range(2))
    for bad in [(x[:, :5].copy(), h, c), (x, h[:1].copy(), c), (x, h, c[:, :3].copy())]:
        with pytest.raises(ValueError, match="does not match"):
            plan.run(*bad)
    with pytest.raises(ValueError, match="x_t has shape"):
        f.step(x[:, :5], f.zero_state(4))


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("shape", [(12, 1, 64, 128), (6, 20, 48, 96), (5, 70, 128, 256)])
def test_one_and_two_threads_give_the_same_bits(precision, shape, rng):
    T, B, I, H = shape
    _, m = torch_model(I, H, bidirectional=True)
    # 20 calls: the first ones of a shape run on one thread (lf_split.h), later ones on two
    _assert_twenty_two_thread_calls_match_one(m.freeze(precision=precision), (T, B, I), rng)


@pytest.mark.parametrize("precision", REDUCED)
def test_threads_or_one_by_measurement_keep_the_bits(precision, rng):
    """A layer with work for two threads runs on two or on one as measured faster for its shape
    (the first 16 calls try both ways): every call gives the one-thread bits."""
    _, m = torch_model(64, 128)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((6, 48, 64)).astype(np.float32)
    with lf.threads(1):
        want = flat(f(x))
    with lf.threads(2):
        for _ in range(40):
            for a, b in zip(want, flat(f(x))):
                np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- paths
@pytest.mark.parametrize("precision", REDUCED)
def test_every_path_same_bits_int8_close_bfloat16(precision, forced, rng):
    _, m = torch_model(40, 48, num_layers=2, bidirectional=True, proj_size=20)
    x = rng.standard_normal((9, 19, 40)).astype(np.float32)
    got = {}
    for path in PATHS[precision]:
        forced(path)
        f = m.freeze(precision=precision)
        assert f.kernel_path == path
        got[path] = flat(f(x))
    forced(None)
    base = got["generic"]
    if "amx" in got:
        for a, b in zip(got["amx"], got["amx_emulated"]):
            np.testing.assert_array_equal(a, b)
    for path, res in got.items():
        if precision == "int8" or path in SAME_BITS_BF16:
            for a, b in zip(base, res):
                np.testing.assert_array_equal(a, b, err_msg=path)
        else:   # AMX's TDPBF16PS sums even and odd elements apart: a few float32 ulps
            assert maxerr(res, base) < 1e-4, path


def _run_in_child(isa, precision):
    """Under LSTM_FAST_ISA=isa: the path a frozen model takes, its output's bytes, and the bytes
    with the products forced to the portable path (the same cap, so the same float32 cell)."""
    code = (
        "import numpy as np, lstm_fast as lf, torch, sys\n"
        "from lstm_fast import _precision\n"
        "torch.manual_seed(0)\n"
        "m = lf.LSTM.from_torch(torch.nn.LSTM(16, 32, bidirectional=True))\n"
        f"f = m.freeze(precision={precision!r})\n"
        "x = np.random.default_rng(0).standard_normal((5, 3, 16)).astype(np.float32)\n"
        "from lstm_fast import _lowp, _cpu\n"
        "assert _lowp.cell_isa() == _cpu.kernel_settings()[0], (_lowp.cell_isa(), _cpu.isa())\n"
        "out = f(x)[0]\n"
        "_precision._force_path('generic')\n"
        f"g = m.freeze(precision={precision!r})\n"
        "sys.stdout.write(' '.join([f.kernel_path, out.tobytes().hex(), g(x)[0].tobytes().hex()]))\n"
    )
    env = dict(os.environ, LSTM_FAST_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    path, data, generic = res.stdout.split()
    return path, np.frombuffer(bytes.fromhex(data), np.float32), np.frombuffer(bytes.fromhex(generic), np.float32)


@pytest.mark.parametrize("precision", REDUCED)
def test_lstm_fast_isa_forces_a_lower_path(precision):
    """LSTM_FAST_ISA caps the products' path and the float32 cell after them (the float32
    model's, AVX-512, AVX2 or scalar): under each cap, int8 (and bfloat16 between VDPBF16PS, the
    FMA paths and the portable one) gives the bits of the portable products; across caps, the
    cells' last bits may differ."""
    path_g, bits_g, gen_g = _run_in_child("generic", precision)
    assert path_g == "generic"
    path_a, bits_a, gen_a = _run_in_child("avx512", precision)
    assert path_a in ("generic", "avx512_bf16", "avx512_vnni", "avx512_fma", "avx2_fma", "avx2")
    path_2, bits_2, gen_2 = _run_in_child("avx2", precision)
    if precision == "bfloat16" and FEAT["avx2_fma"]:
        assert path_2 == "avx2_fma"
    elif precision == "int8" and FEAT["avx2"]:
        assert path_2 == "avx2"
    else:
        assert path_2 == "generic"
    if precision == "bfloat16" and FEAT["avx512_fma"] and not FEAT["avx512_bf16"]:
        assert path_a == "avx512_fma"
    for bits, gen in ((bits_g, gen_g), (bits_a, gen_a), (bits_2, gen_2)):
        np.testing.assert_array_equal(bits.view(np.uint32), gen.view(np.uint32))
    for bits in (bits_a, bits_2):
        np.testing.assert_allclose(bits, bits_g, rtol=0, atol=1e-6)


def test_an_unknown_isa_value_warns_and_is_ignored():
    # the same rule as the float32 kernels (lstm_fast._cpu): a warning naming the variable and
    # the accepted values, then the paths the CPU would run without it
    code = ("import warnings, lstm_fast as lf, lstm_fast._precision as p, lstm_fast._cpu as c\n"
            "warnings.simplefilter('always')\n"
            "c.isa()\n"
            "print(p.path_for('int8'), p.path_for('bfloat16'), c.isa())\n")
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = {k: val for k, val in os.environ.items() if k != "LSTM_FAST_ISA"}
    bad, good = run(dict(base, LSTM_FAST_ISA="sse9")), run(base)
    assert bad.returncode == 0 and good.returncode == 0, bad.stderr + good.stderr
    assert "LSTM_FAST_ISA" in bad.stderr and "generic" in bad.stderr, bad.stderr
    assert bad.stdout == good.stdout


def test_show_config_names_the_path_of_each_precision(capsys):
    lf.show_config()
    text = capsys.readouterr().out
    for precision in ("float32", "bfloat16", "int8"):
        line = [ln for ln in text.splitlines() if ln.strip().startswith(f"path {precision}")]
        assert line, text
    cfg = lf._config.config()
    assert cfg["path bfloat16"] == _precision.path_for("bfloat16")
    assert cfg["path int8"] in ("amx", "avx512_vnni", "avx2", "generic")


# ---------------------------------------------------------------------------- files, errors
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_and_pickle_keep_precision_and_bits(precision, suffix, tmp_path, rng):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    _, m = torch_model(6, 10, num_layers=2, proj_size=4)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((5, 2, 6)).astype(np.float32)
    want = flat(f(x))
    path = tmp_path / f"m{suffix}"
    f.save(path)
    for g in (lf.load(path), pickle.loads(pickle.dumps(f))):
        assert isinstance(g, lf.FrozenLSTM) and g.precision == precision
        for a, b in zip(flat(g(x)), want):
            np.testing.assert_array_equal(a, b)


def test_float32_freeze_unchanged():
    m = lf.LSTM(4, 6, seed=0)
    f = m.freeze()
    assert f.precision == "float32" and f.freeze() is f and f.freeze("float32") is f
    x = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float32)
    for a, b in zip(flat(f(x)), flat(m(x))):
        np.testing.assert_array_equal(a, b)
    g = f.freeze("int8")                        # a frozen model converts to another precision
    assert g.precision == "int8" and maxerr(flat(g(x)), flat(m(x))) < 2e-2


def test_bad_precision_requests_are_clear_errors():
    m = lf.LSTM(4, 6, seed=0)
    for bad in ("float16", "bf16", "INT8", 8, None):
        with pytest.raises(ValueError, match="precision must be one of"):
            m.freeze(precision=bad)
    with pytest.raises(ValueError, match="float32 model"):
        lf.LSTM(4, 6, dtype=np.float64, seed=0).freeze(precision="bfloat16")
    for value in (np.nan, np.inf):
        m2 = lf.LSTM(4, 6, seed=0)
        m2.parameters()["weight_hh_l0"][1, 2] = value
        for precision in REDUCED:
            with pytest.raises(ValueError, match="weight_hh_l0.*NaN or inf"):
                m2.freeze(precision=precision)
    m3 = lf.LSTM(4, 6, seed=0)
    m3.parameters()["weight_ih_l0"][0, 0] = 3.4e38
    with pytest.raises(ValueError, match="bfloat16's largest"):
        m3.freeze(precision="bfloat16")


def test_reduced_model_is_still_read_only():
    f = lf.LSTM(4, 6, seed=0).freeze(precision="int8")
    with pytest.raises(TypeError):
        f.load_state_dict(f.state_dict())
    with pytest.raises(ValueError):
        f.parameters()["weight_ih_l0"][0, 0] = 1.0


@pytest.mark.skipif(not FEAT["amx_granted"], reason="no AMX on this CPU")
def test_forced_amx_path_asks_for_the_tile_state_first():
    """A process whose first reduced-precision call runs the AMX path (nothing asked the OS for
    the tile state before): was SIGILL."""
    code = (
        "import numpy as np, lstm_fast as lf\n"
        "from lstm_fast import _precision\n"
        "_precision._force_path('amx')\n"
        "m = lf.LSTM(8, 16)\n"
        "f = m.freeze(precision='int8')\n"
        "print(f(np.ones((3, 2, 8), np.float32))[0].shape)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr)
    assert res.stdout.strip() == "(3, 2, 16)"


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("kw", [{"bidirectional": True}, {"proj_size": 96}, {"num_layers": 2}],
                         ids=["bidir", "proj", "2layer"])
def test_rows_split_between_threads_give_the_one_thread_bits(precision, kw, rng):
    # 40 rows on two threads: each thread owns 20 rows for the whole recurrence (no barrier a
    # step); the first 16 calls of a shape try one thread, then both (lf_split.h), so 20 calls
    # include split ones. Lengths: the two shares run out at different steps.
    _, m = torch_model(64, 128, **kw)      # work enough for two threads (threads_rec)
    _assert_twenty_two_thread_calls_match_one(m.freeze(precision=precision), (9, 40, 64), rng)


def _assert_close_to_torch(t, out, x, lengths, tol=1e-2):
    """Each row of `out` against torch.nn.LSTM `t` (float32) run on that row alone, up to its
    length: within `tol` (these models' errors: 2e-4 to 2e-3, bfloat16 and int8)."""
    for b, n in enumerate(lengths):
        with torch.no_grad():
            want = t(torch.from_numpy(np.ascontiguousarray(x[:n, b:b + 1])))[0].numpy()
        assert maxerr([out[:n, b:b + 1]], [want]) < tol, b


def _assert_twenty_two_thread_calls_match_one(f, shape, rng):
    T, B, I = shape
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    with lf.threads(1):
        want = flat(f(x, lengths=lengths))
    with lf.threads(2):
        for _ in range(20):
            for a, b in zip(want, flat(f(x, lengths=lengths))):
                np.testing.assert_array_equal(a, b)


@pytest.fixture
def rows_bound():
    """Sets the weight bytes up to which a layer runs split by rows (lowp_rows_max_bytes; 0: never),
    restored afterwards."""
    from lstm_fast import _cpu

    code, params = _cpu.kernel_settings()
    yield lambda n: _lowp._set_kernel(code, dict(params, lowp_rows_max_bytes=n))
    _cpu._apply()


@pytest.mark.parametrize("precision", REDUCED)
def test_columns_split_between_threads_give_the_one_thread_bits(precision, rows_bound, rng):
    # weights over the rows bound: the inputs projected up front, then the threads share each
    # step's gate columns, with a barrier after the product and after the cells; lengths, 20
    # calls as above
    rows_bound(0)
    _, m = torch_model(32, 256, bidirectional=True)
    _assert_twenty_two_thread_calls_match_one(m.freeze(precision=precision), (5, 24, 32), rng)


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_projecting_their_own_inputs_give_the_up_front_bits(precision, threads, rows_bound,
                                                                  rng):
    # split by rows, each thread (or one alone, from 16 rows) quantizes and projects its rows'
    # x_t step by step, gathered by the order (lengths) and read backwards by the reverse
    # direction; the up-front projection of every step (rows bound 0) gives the same bits
    _, m = torch_model(24, 40, num_layers=2, bidirectional=True, proj_size=16)
    f = m.freeze(precision=precision)
    x = rng.standard_normal((7, 20, 24)).astype(np.float32)
    lengths = rng.integers(1, 8, size=20)
    lengths[3] = 7
    got = {}
    for bound in (0, 1 << 30):
        rows_bound(bound)
        with lf.threads(threads):
            got[bound] = [flat(f(x, lengths=lengths)) for _ in range(20)]
    for run in got[1 << 30] + got[0][1:]:
        for a, b in zip(got[0][0], run):
            np.testing.assert_array_equal(a, b)


@pytest.fixture
def split_way():
    """_lowp.set_split_way(...) for the test; measured again (and no forced lone steps) after."""
    yield _lowp.set_split_way
    _lowp.set_split_way("measured")
    _lowp.set_split_alone(0)


@pytest.mark.skipif(_lowp.cell_isa() == 0,
                    reason="split by units takes the SIMD cell (LSTM_FAST_ISA=generic, or no AVX2)")
@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("path", ["generic", "amx_emulated", "native"])
def test_split_by_units_gives_the_one_thread_bits(precision, path, forced, split_way, rng):
    """A few rows, one direction, two threads: each thread takes its 32-unit panels of every
    step (and of each block's input projection), the calling thread first running whole steps
    alone for 0 to T steps (the team opening in the middle of a projection block, at its start,
    just after it, or never). Lengths end rows early (at T = 40 all of them). Every output has
    the one-thread bits."""
    if path != "native":
        forced(path)
    for T, B, I, H in [(40, 1, 32, 64), (35, 3, 20, 96), (33, 7, 16, 128)]:
        t, m = torch_model(I, H, num_layers=2)
        f = m.freeze(precision=precision)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        lengths = rng.integers(T // 2, T - 4, size=B)
        lengths[0] = T if T % 2 else T - 5     # at T = 40 every row ends before T
        split_way("one")
        with lf.threads(2):
            want = flat(f(x, lengths=lengths))
        split_way("split")
        for alone in (0, 1, 15, 16, 17, T):
            _lowp.set_split_alone(alone)
            runs = _lowp.split_runs()
            with lf.threads(2):
                got = flat(f(x, lengths=lengths))
            assert _lowp.split_runs() == runs + 2          # both layers ran split
            for a, b in zip(want, got):
                np.testing.assert_array_equal(a, b, err_msg=str((T, B, H, alone)))
        _assert_close_to_torch(t, got[0], x, lengths)


@pytest.mark.skipif(_lowp.cell_isa() == 0, reason="the fused batch-1 products run beside the SIMD cell")
@pytest.mark.parametrize("precision", REDUCED)
def test_fused_batch1_gives_the_generic_bits(precision, forced, split_way, rng):
    """Batch 1 on VDPBF16PS or VPDPBUSD: each step's W_hh product carries a share of the next
    block's input projection (one thread, and each thread of split by units whose share of W_hh
    is 64 KB or more; bidirectional: each direction on a thread of its own, or both on one).
    Inputs wider and narrower than H, T past and short of a whole block, a length below T (the
    reverse direction from there), an initial state, two layers; the team opening within a block
    (a thread then carries the shares of the steps left and projects the rest at the next block's
    start), at its start, just after and never. Every output has the generic path's bits (the
    same VDPBF16PS chain; int8's exact sums), and blocks were projected fused."""
    native = {"bfloat16": "avx512_bf16", "int8": "avx512_vnni"}[precision]
    if not FEAT[native]:
        pytest.skip(f"no {native}")
    # int8 at H = 128 on two threads: 32 KB a thread, not fused (H = 160: one thread of two)
    for T, I, H, layers, bi in [(40, 128, 128, 1, False), (57, 300, 160, 2, False),
                                (33, 40, 256, 1, False), (64, 16, 128, 1, False),
                                (45, 64, 128, 1, True), (50, 200, 160, 2, True)]:
        t, m = torch_model(I, H, num_layers=layers, bidirectional=bi)
        x = rng.standard_normal((T, 1, I)).astype(np.float32)
        lengths = [T - 3]
        n_states = layers * (2 if bi else 1)
        hx = (rng.standard_normal((n_states, 1, H)).astype(np.float32),
              rng.standard_normal((n_states, 1, H)).astype(np.float32))
        forced("generic")
        want = flat(m.freeze(precision=precision)(x, hx, lengths=lengths))
        forced(native)          # also under LSTM_FAST_ISA=avx2 (the cell's cap; make test-isa)
        f = m.freeze(precision=precision)
        for threads, way, alone in [(1, "one", 0), (2, "one", 0), (2, "split", 0), (2, "split", 5),
                                    (2, "split", 16), (2, "split", 17), (2, "split", T)]:
            split_way(way)
            _lowp.set_split_alone(alone)
            runs, blocks = _lowp.split_runs("fused"), _lowp.split_runs("fused_blocks")
            with lf.threads(threads):
                got = flat(f(x, hx, lengths=lengths))
            assert _lowp.split_runs("fused") == runs + layers
            # from the second block on (the calling thread carries it whatever step the team
            # opens at, where its share is large enough)
            if way == "one" or precision == "bfloat16" or H != 128 or bi:
                assert _lowp.split_runs("fused_blocks") > blocks, (T, H, threads, way, alone)
            for a, b in zip(want, got):
                np.testing.assert_array_equal(a, b, err_msg=str((T, I, H, threads, way, alone)))
        if layers == 1:
            with torch.no_grad():
                ref = t(torch.from_numpy(x[:T - 3]),
                        tuple(torch.from_numpy(v) for v in hx))[0].numpy()
            assert maxerr([got[0][:T - 3]], [ref]) < 1e-2


@pytest.mark.parametrize("precision", REDUCED)
def test_split_by_units_only_where_it_can_run(precision, split_way, rng):
    # bidirectional, projections, 8+ rows, H not whole 32-unit panels, short sequences, one
    # thread, and the scalar cell (LSTM_FAST_ISA=generic) run the other ways (split forced on,
    # none of these counts a split run)
    split_way("split")
    for kw, (T, B, I, H), threads in [({"bidirectional": True}, (40, 1, 8, 64), 2),
                                      ({"proj_size": 16}, (40, 1, 8, 64), 2),
                                      ({}, (40, 8, 8, 64), 2), ({}, (40, 1, 8, 80), 2),
                                      ({}, (40, 1, 8, 32), 2), ({}, (31, 1, 8, 64), 2),
                                      ({}, (40, 1, 8, 64), 1)]:
        _, m = torch_model(I, H, **kw)
        runs = _lowp.split_runs()
        with lf.threads(threads):
            m.freeze(precision=precision)(rng.standard_normal((T, B, I)).astype(np.float32))
        assert _lowp.split_runs() == runs, (kw, T, B, H, threads)
    _, m = torch_model(8, 64)
    with lf.threads(2):
        m.freeze(precision=precision)(rng.standard_normal((32, 1, 8)).astype(np.float32))
    assert _lowp.split_runs() == runs + (_lowp.cell_isa() > 0)


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("path", ["generic", "amx_emulated", "native"])
def test_split_by_directions_gives_the_one_thread_bits(precision, path, forced, split_way, rng):
    """Bidirectional on two threads with too few rows for the row split: each thread claims a
    direction and runs it whole (its own projection, its recurrence, no barrier). Lengths run
    the reverse direction from each row's own end; projections; two layers. The one-thread
    bits."""
    if path != "native":
        forced(path)
    for (T, B, I, H), kw in [((30, 1, 32, 64), {}), ((20, 3, 20, 96), {"proj_size": 16}),
                             ((17, 15, 16, 40), {"num_layers": 2})]:
        t, m = torch_model(I, H, bidirectional=True, **kw)
        f = m.freeze(precision=precision)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
        split_way("one")
        with lf.threads(2):
            want = flat(f(x, lengths=lengths))
        split_way("split")
        runs = _lowp.split_runs("directions")
        with lf.threads(2):
            got = flat(f(x, lengths=lengths))
        assert _lowp.split_runs("directions") == runs + kw.get("num_layers", 1)
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b, err_msg=str((T, B, H)))
        _assert_close_to_torch(t, got[0], x, lengths)
    # not with one thread or three, nor one direction, nor rows enough for the row split (16
    # on two threads, AMX and its emulation 64)
    for kw, B, threads in [({"bidirectional": True}, 2, 1), ({"bidirectional": True}, 2, 3),
                           ({}, 2, 2), ({"bidirectional": True}, 64, 2)]:
        _, m = torch_model(8, 32, **kw)
        runs = _lowp.split_runs("directions")
        with lf.threads(threads):
            m.freeze(precision=precision)(rng.standard_normal((5, B, 8)).astype(np.float32))
        assert _lowp.split_runs("directions") == runs, (kw, B, threads)
