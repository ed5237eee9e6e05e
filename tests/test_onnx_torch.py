"""What torch.onnx.export really writes for torch.nn.LSTM modules: lf.onnx.load runs every file
ONNX Runtime runs and matches it; LSTM.from_onnx represents the graph or refuses, naming what it
would drop. Exports are made once per session, into memory."""
import io
import itertools
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

import lstm_fast as lf

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TOL = dict(rtol=1e-5, atol=2e-6)   # as tests/test_onnx.py
I, H, PROJ, OUT = 3, 8, 4, 2
T0, B0 = 5, 2        # the shapes of the export
T1, B1 = 7, 3        # the shapes of the run, for exports with dynamic axes

# opset, layers, bidirectional, batch_first, bias, proj_size, initial states, dynamic axes, head
AXES = dict(opset=[14, 17], layers=[1, 2], bidirectional=[False, True], batch_first=[False, True],
            bias=[True, False], proj=[0, PROJ], states=[False, True], dynamic=[False, True],
            head=["none", "linear", "last"])
FULL = list(itertools.product(*AXES.values()))


def _cover():
    """A small set of configurations in which every pair of values of two axes occurs (greedy
    all-pairs cover, deterministic)."""
    names = list(AXES)
    pairs = {(a, x, b, y) for a, b in itertools.combinations(range(len(names)), 2)
             for x in AXES[names[a]] for y in AXES[names[b]]}
    chosen = []
    while pairs:
        best = max(FULL, key=lambda c: sum((a, c[a], b, c[b]) in pairs
                                           for a, b in itertools.combinations(range(len(c)), 2)))
        chosen.append(best)
        pairs -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(best)), 2)}
    return chosen


COVER = _cover()


def _ids(cfg):
    opset, L, bi, bf, bias, proj, st, dyn, head = cfg
    return (f"op{opset}-L{L}-{'bi' if bi else 'uni'}-{'bf' if bf else 'tf'}-{'b' if bias else 'nob'}"
            f"-p{proj}-{'h0' if st else 'noh0'}-{'dyn' if dyn else 'static'}-{head}")


class _Net(torch.nn.Module):
    def __init__(self, layers, bi, bf, bias, proj, head):
        super().__init__()
        self.lstm = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=bi, batch_first=bf,
                                  bias=bias, proj_size=proj)
        self.head, self.bf = head, bf
        if head != "none":
            self.lin = torch.nn.Linear((2 if bi else 1) * (proj or H), OUT)

    def forward(self, x, h0=None, c0=None):
        y, (h, c) = self.lstm(x) if h0 is None else self.lstm(x, (h0, c0))
        if self.head == "linear":
            y = self.lin(y)
        elif self.head == "last":
            y = self.lin(y[:, -1] if self.bf else y[-1])
        return y, h, c


def _inputs(cfg, T, B, seed):
    opset, L, bi, bf, bias, proj, st, dyn, head = cfg
    g = torch.Generator().manual_seed(seed)
    D = 2 if bi else 1
    x = torch.randn((B, T, I) if bf else (T, B, I), generator=g)
    if not st:
        return (x,)
    return x, torch.randn(L * D, B, proj or H, generator=g), torch.randn(L * D, B, H, generator=g)


_CACHE = {}


def _export(cfg, dynamo=False):
    """(torch module, ONNX bytes or the exporter's exception), once per session."""
    key = (cfg, dynamo)
    if key not in _CACHE:
        opset, L, bi, bf, bias, proj, st, dyn, head = cfg
        torch.manual_seed(sum(map(hash, map(str, cfg))) % 1000)
        net = _Net(L, bi, bf, bias, proj, head).eval()
        args = _inputs(cfg, T0, B0, 0)
        names = ["x", "h0", "c0"][:len(args)]
        f = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(net, args, f, input_names=names, output_names=["y", "h", "c"],
                                      dynamo=True, verbose=False)
                else:
                    axes = None
                    if dyn:
                        axes = {"x": {0: "b", 1: "t"} if bf else {0: "t", 1: "b"}}
                        axes.update({n: {1: "b"} for n in names[1:]})
                    torch.onnx.export(net, args, f, opset_version=opset, input_names=names,
                                      output_names=["y", "h", "c"], dynamic_axes=axes, dynamo=False)
            result = f.getvalue()
        except Exception as exc:   # the exporter refuses some configurations itself
            result = exc
        _CACHE[key] = (net, result)
    return _CACHE[key]


def _check_file(cfg, dynamo=False):
    """Returns 'refused by the exporter', 'refused by ORT' or 'matched'."""
    opset, L, bi, bf, bias, proj, st, dyn, head = cfg
    net, data = _export(cfg, dynamo)
    if isinstance(data, Exception):
        assert proj, f"the exporter refused a configuration without projection: {data}"
        return "exporter refused"
    T, B = (T1, B1) if dyn and not dynamo else (T0, B0)
    args = _inputs(cfg, T, B, 1)
    feeds = {n: a.numpy() for n, a in zip(["x", "h0", "c0"], args)}
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        expected = sess.run(None, feeds)
    except Exception:   # ORT refuses the file (dynamo's projection graphs): so must we, cleanly
        with pytest.raises(ValueError):
            lf.onnx.load(data).run(None, feeds)
        return "ORT refused"
    with torch.no_grad():   # the file is what torch computes (else the comparison means little)
        for a, b in zip(expected, net(*args)):
            assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)
    got = lf.onnx.load(data).run(None, feeds)
    assert len(got) == len(expected)
    for name, a, b in zip(("y", "h", "c"), got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_allclose(a, b, err_msg=name, **TOL)
    for name, a in feeds.items():   # the feeds are not modified
        assert np.array_equal(a, _inputs(cfg, T, B, 1)[["x", "h0", "c0"].index(name)].numpy())
    _check_from_onnx(cfg, data, feeds, expected)
    return "matched"


def _check_from_onnx(cfg, data, feeds, expected):
    opset, L, bi, bf, bias, proj, st, dyn, head = cfg
    if head != "none":
        with pytest.raises(ValueError, match="would drop") as info:
            lf.LSTM.from_onnx(data)
        assert "Gemm" in str(info.value) or "MatMul" in str(info.value)
        if head == "last":
            assert "Gather" in str(info.value)
        return
    model = lf.LSTM.from_onnx(data)
    assert (model.num_layers, model.bidirectional, model.batch_first, model.bias, model.proj_size) \
        == (L, bi, bf, bias, proj)
    hx = (feeds["h0"], feeds["c0"]) if st else None
    y, (h, c) = model(feeds["x"], hx)
    for name, a, b in zip(("y", "h", "c"), (y, h, c), expected):
        assert_allclose(a, b, err_msg=name, **TOL)


@pytest.mark.parametrize("cfg", COVER, ids=_ids)
def test_torch_exports_run_and_match_onnxruntime(cfg):
    _check_file(cfg)


@pytest.mark.slow
def test_torch_exports_full_matrix():
    counts = {}
    for cfg in FULL:
        outcome = _check_file(cfg)
        counts[outcome] = counts.get(outcome, 0) + 1
    print("\ntorch.onnx.export matrix:", len(FULL), "configurations,", counts)
    assert counts.get("matched", 0) == len(FULL) // 2


DYNAMO = [(20, 1, False, False, True, 0, False, False, "none"),
          (20, 2, True, True, True, 0, True, False, "linear"),
          (20, 1, False, True, False, 0, True, False, "last"),
          (20, 1, True, False, True, PROJ, False, False, "none")]


@pytest.mark.parametrize("cfg", DYNAMO, ids=_ids)
def test_dynamo_exports(cfg):
    pytest.importorskip("onnxscript")
    net, data = _export(cfg, dynamo=True)
    if isinstance(data, Exception):
        pytest.skip(f"the dynamo exporter fails here: {type(data).__name__}")
    _check_file(cfg, dynamo=True)
