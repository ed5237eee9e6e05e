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
    all-pairs cover, deterministic), among those the TorchScript exporter writes (proj_size=0:
    it refuses projections), and one projection that it refuses."""
    axes = dict(AXES, proj=[0])
    writable = [c for c in FULL if c[5] == 0]
    pairs = {(a, x, b, y) for a, b in itertools.combinations(range(len(axes)), 2)
             for x in list(axes.values())[a] for y in list(axes.values())[b]}
    chosen = [(17, 2, True, True, True, PROJ, True, True, "last")]
    while pairs:
        best = max(writable, key=lambda c: sum((a, c[a], b, c[b]) in pairs
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
        with pytest.raises(ValueError):
            lf.LSTM.from_onnx(data)
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


# ---------------------------------------------------------------------------- from_onnx cases
def _data(cfg):
    net, data = _export(cfg)
    assert not isinstance(data, Exception)
    return net, data


def test_from_onnx_refuses_dynamo_projection_exports():
    """dynamo writes an LSTM with projection as an ONNX LSTM of hidden proj_size whose constant
    initial_c has hidden_size features (ONNX Runtime refuses it); never a model without projection."""
    pytest.importorskip("onnxscript")
    net, data = _export(DYNAMO[-1], dynamo=True)
    if isinstance(data, Exception):
        pytest.skip(f"the dynamo exporter fails here: {type(data).__name__}")
    with pytest.raises(ValueError, match=r"initial_c has shape \(2, 2, 8\)"):
        lf.LSTM.from_onnx(data)
    (info,) = lf.onnx.lstm_nodes(data)
    assert info.refusal and "initial_c" in info.refusal


def test_from_onnx_refuses_a_hidden_size_attribute_that_disagrees():
    net, data = _data((17, 1, False, False, True, 0, False, False, "none"))
    model = onnx.load_from_string(data)
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    next(a for a in node.attribute if a.name == "hidden_size").i = 5
    with pytest.raises(ValueError, match="hidden_size attribute is 5 but R has shape"):
        lf.LSTM.from_onnx(model)
    with pytest.raises(ValueError, match="hidden_size attribute is 5"):
        lf.LSTM.from_onnx(model, node=node.name)
    with pytest.raises(ValueError, match="hidden_size=5"):   # and the graph does not run
        lf.onnx.load(model).run(None, {"x": np.zeros((T0, B0, I), np.float32)})


class _Extra(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(I, H, batch_first=True)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        return torch.relu(y) * 2.0, torch.softmax(h, -1), torch.sigmoid(c).double()


def test_extra_operators_run_in_load_and_are_named_by_from_onnx():
    torch.manual_seed(0)
    net = _Extra().eval()
    x = torch.randn(B0, T0, I)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), f, opset_version=14, input_names=["x"],
                          output_names=["y", "h", "c"], dynamo=False)
    feeds = {"x": x.numpy()}
    expected = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = lf.onnx.load(f.getvalue()).run(None, feeds)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        assert_allclose(a, b, **TOL)
    with pytest.raises(ValueError, match=r"would drop .*Relu.*Mul.*Softmax.*Sigmoid.*Cast"):
        lf.LSTM.from_onnx(f.getvalue())
    # the LSTM alone
    (info,) = lf.onnx.lstm_nodes(f.getvalue())
    assert (info.graph, info.input_size, info.hidden_size, info.direction, info.refusal) == \
        ("main", I, H, "forward", None)
    alone = lf.LSTM.from_onnx(f.getvalue(), node=info.name)
    with torch.no_grad():
        y_t, (h_t, c_t) = net.lstm(x)
    y, (h, c) = alone(x.numpy().transpose(1, 0, 2))
    assert_allclose(y.transpose(1, 0, 2), y_t.numpy(), **TOL)
    assert_allclose(h, h_t.numpy(), **TOL)


class _Tagger(torch.nn.Module):
    """Features computed before the LSTM (Linear, tanh), a head after it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(5, I)
        self.lstm = torch.nn.LSTM(I, H, bidirectional=True)
        self.head = torch.nn.Linear(2 * H, OUT)

    def forward(self, x):
        y, _ = self.lstm(torch.tanh(self.embed(x)))
        return torch.softmax(self.head(y), -1)


def test_from_onnx_names_what_runs_before_the_lstm():
    """A graph that computes the LSTM's input from its own: from_onnx names those nodes (before,
    it ran the graph on an input of the LSTM's width and failed in the first MatMul)."""
    torch.manual_seed(0)
    net = _Tagger().eval()
    x = torch.randn(T0, B0, 5)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), f, input_names=["x"], output_names=["p"], opset_version=17,
                          dynamo=False)
    expected = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    (got,) = lf.onnx.load(f.getvalue()).run(None, {"x": x.numpy()})
    assert_allclose(got, expected[0], **TOL)
    with pytest.raises(ValueError, match=r"would drop what the graph computes before its first LSTM "
                                         r"node: MatMul .*, Add .*, Tanh .*, and after its LSTM nodes: "
                                         r"MatMul .*, Add .*, Softmax"):
        lf.LSTM.from_onnx(f.getvalue())
    alone = lf.LSTM.from_onnx(f.getvalue(), node=0)
    with torch.no_grad():
        features = torch.tanh(net.embed(x))
        y_t, _ = net.lstm(features)
    assert_allclose(alone(features.numpy())[0], y_t.numpy(), **TOL)


def _with_casts(to):
    """lf's own export of an LSTM with Cast(to=`to`) nodes on its three outputs."""
    from onnx import helper

    model = lf.onnx.export(lf.LSTM(I, H, seed=0))
    graph = model.graph
    for out in graph.output:
        for node in graph.node:
            node.output[:] = [o + "_pre" if o == out.name else o for o in node.output]
        graph.node.append(helper.make_node("Cast", [out.name + "_pre"], [out.name], to=to,
                                           name=f"cast_{out.name}"))
        out.type.tensor_type.elem_type = to
    onnx.checker.check_model(model)
    return model


def test_from_onnx_names_a_cast_that_changes_the_dtype():
    """A Cast to float64 after the LSTM makes the graph's outputs float64: an lf.LSTM (float32)
    would drop it, so from_onnx refuses naming it; a Cast to float32 changes nothing."""
    from onnx import TensorProto

    x = np.random.default_rng(0).standard_normal((T0, B0, I)).astype(np.float32)
    model = _with_casts(TensorProto.DOUBLE)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    got = lf.onnx.load(model).run(None, {"input": x})
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == np.float64
        assert_allclose(a, b, **TOL)
    with pytest.raises(ValueError, match=r"would drop .*Cast \('cast_output'\), Cast \('cast_h_n'\), "
                                         r"Cast \('cast_c_n'\).*float64"):
        lf.LSTM.from_onnx(model)
    same = lf.LSTM.from_onnx(_with_casts(TensorProto.FLOAT))
    y, (h, c) = same(x)
    ref, (h_ref, c_ref) = lf.LSTM(I, H, seed=0)(x)
    assert np.array_equal(y, ref) and np.array_equal(h, h_ref) and np.array_equal(c, c_ref)


@pytest.mark.parametrize("layers, bi", [(1, False), (2, True)])
def test_from_onnx_node_takes_an_lstm_out_of_a_graph_with_a_head(layers, bi):
    net, data = _data((17, layers, bi, True, True, 0, True, True, "last"))
    nodes = lf.onnx.lstm_nodes(data)
    assert [(n.index, n.input_size, n.hidden_size, n.num_directions, n.initial_states) for n in nodes] \
        == [(k, I if k == 0 else (2 if bi else 1) * H, H, 2 if bi else 1, "input") for k in range(layers)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B1, T1, I, generator=g)
    D = 2 if bi else 1
    with torch.no_grad():   # layer 0 of torch's LSTM, with zero states
        first = torch.nn.LSTM(I, H, bidirectional=bi, batch_first=True)
        first.load_state_dict({k: v for k, v in net.lstm.state_dict().items() if "_l0" in k})
        y_t, (h_t, c_t) = first(x)
    for node in (nodes[0].name, 0, nodes[0].name and next(
            n for n in onnx.load_from_string(data).graph.node if n.op_type == "LSTM").output[0]):
        alone = lf.LSTM.from_onnx(data, node=node)
        assert (alone.num_layers, alone.num_directions, alone.batch_first) == (1, D, False)
        y, (h, c) = alone(x.numpy().transpose(1, 0, 2))
        assert_allclose(y.transpose(1, 0, 2), y_t.numpy(), **TOL)
        assert_allclose(c, c_t.numpy(), **TOL)
    with pytest.raises(ValueError, match=r"no LSTM node 'nope'.*0: "):
        lf.LSTM.from_onnx(data, node="nope")
    with pytest.raises(TypeError, match="node must be"):
        lf.LSTM.from_onnx(data, node=1.5)


def _silero_like(flag_hidden=(6, 4)):
    """A graph like silero-vad's: a Conv front end, then an If whose branches hold an LSTM each
    (weights as initializers of the subgraph), the state fed from outside."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    branches, weights = {}, {}
    for branch, hid in zip(("then_branch", "else_branch"), flag_hidden):
        W = (rng.standard_normal((1, 4 * hid, 4)) * 0.4).astype(np.float32)
        R = (rng.standard_normal((1, 4 * hid, hid)) * 0.4).astype(np.float32)
        Bias = (rng.standard_normal((1, 8 * hid)) * 0.4).astype(np.float32)
        weights[branch] = (W, R, Bias)
        name = f"lstm_{branch.split('_')[0]}"
        nodes = [helper.make_node("Transpose", ["feat"], ["feat_t"], perm=[2, 0, 1]),
                 helper.make_node("LSTM", ["feat_t", f"W_{name}", f"R_{name}", f"B_{name}", "",
                                           "h0" if hid == flag_hidden[0] else "", "c0" if hid == flag_hidden[0] else ""],
                                  [f"Y_{name}", f"Yh_{name}", ""], hidden_size=hid, name=name),
                 helper.make_node("Identity", [f"Y_{name}"], [f"out_{branch}"])]
        inits = [numpy_helper.from_array(a, f"{k}_{name}") for k, a in zip("WRB", (W, R, Bias))]
        branches[branch] = helper.make_graph(nodes, branch, [], [helper.make_tensor_value_info(
            f"out_{branch}", TensorProto.FLOAT, None)], initializer=inits)
    conv_w = (rng.standard_normal((4, 1, 3)) * 0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["audio", "conv_w"], ["feat"], pads=[1, 1], name="conv"),
             helper.make_node("If", ["flag"], ["prob"], name="If_0", **branches)]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, [1, 1, 10]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 1, flag_hidden[0]]),
         helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, 1, flag_hidden[0]])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [10, 1, 1, None])],
        initializer=[numpy_helper.from_array(conv_w, "conv_w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.checker.check_model(model)
    return model, weights, conv_w


def test_lstm_nodes_inside_if_subgraphs():
    model, weights, conv_w = _silero_like()
    nodes = lf.onnx.lstm_nodes(model)
    assert [(n.name, n.graph, n.input_size, n.hidden_size, n.initial_states, n.refusal) for n in nodes] == [
        ("lstm_then", "main/If_0.then_branch", 4, 6, "input", None),
        ("lstm_else", "main/If_0.else_branch", 4, 4, "zeros", None)]
    with pytest.raises(ValueError, match=r"unsupported ONNX operator 'Conv'.*lstm_nodes.*node="):
        lf.onnx.load(model)
    with pytest.raises(ValueError, match=r"no LSTM node; 2 sit inside subgraphs.*'lstm_then' in main/If_0.then_branch.*node="):
        lf.LSTM.from_onnx(model)
    # the taken-out LSTM computes what the If branch's LSTM computes: its Y (T, 1, 1, H), from ORT
    audio = np.random.default_rng(0).standard_normal((1, 1, 10)).astype(np.float32)
    h0 = np.random.default_rng(1).standard_normal((1, 1, 6)).astype(np.float32)
    c0 = np.random.default_rng(2).standard_normal((1, 1, 6)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feat = np.stack([np.convolve(np.pad(audio[0, 0], 1), conv_w[k, 0][::-1], "valid") for k in range(4)])
    for name, flag, hx in (("lstm_then", True, (h0, c0)), ("lstm_else", False, None)):
        (expected,) = sess.run(None, {"audio": audio, "flag": np.array(flag), "h0": h0, "c0": c0})
        lstm = lf.LSTM.from_onnx(model, node=name)
        y, _ = lstm(feat.T[:, None, :], hx)
        assert expected.shape == (10, 1, 1, lstm.hidden_size)
        assert_allclose(y, expected[:, 0], **TOL)


@pytest.mark.parametrize("attrs, extra, match", [
    ({"clip": 1.0}, [], "clip=1.0"),
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, [], "activations"),
    ({"input_forget": 1}, [], "input_forget"),
    ({"direction": "reverse"}, [], "reverse only"),
    ({}, ["P"], "peepholes"),
    ({}, ["h_const"], "constant non-zero initial_h"),
])
def test_from_onnx_node_refusals(attrs, extra, match):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs = ["X", "W", "R", "B", "", "h_const" if "h_const" in extra else "", "", "P" if "P" in extra else ""]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("W", (1, 4 * H, I)), ("R", (1, 4 * H, H)), ("B", (1, 8 * H)), ("P", (1, 3 * H)),
              ("h_const", (1, 2, H)))]
    node = helper.make_node("LSTM", inputs, ["Y"], hidden_size=H, name="cell", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    with pytest.raises(ValueError, match=match):
        lf.LSTM.from_onnx(model, node="cell")
    with pytest.raises(ValueError, match=match):
        lf.LSTM.from_onnx(model)
    assert match.split()[0] in lf.onnx.lstm_nodes(model)[0].refusal


def test_shape_derived_nodes_run_once_per_input_shape():
    # torch's export of an LSTM without initial states computes zero states from Shape(X): those
    # nodes are evaluated once per input shape and reused; a new batch size gets its own values
    m = torch.nn.LSTM(I, H, num_layers=2).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(T0, B0, I),), buf, input_names=["x"],
                          output_names=["y", "h", "c"], dynamic_axes={"x": {0: "T", 1: "B"}},
                          dynamo=False)
    sess = lf.onnx.load(buf.getvalue())
    ref = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    assert {n.op_type for n, _, _ in sess._static_plan} >= {"Shape", "ConstantOfShape"}
    assert all(n.op_type != "LSTM" for n, _, _ in sess._static_plan)
    rng = np.random.default_rng(0)
    for batch in (B0, B1, B0, 1):
        x = rng.standard_normal((T1, batch, I)).astype(np.float32)
        got = sess.run(None, {"x": x})
        for g, w in zip(got, ref.run(None, {"x": x})):
            assert g.shape == w.shape
            assert_allclose(g, w, **TOL)
        # the same bits as a session that has seen no other shape
        for g, w in zip(got, lf.onnx.load(buf.getvalue()).run(None, {"x": x})):
            np.testing.assert_array_equal(g, w)
    assert len(sess._static_cache) == 3          # batches B0, B1 and 1


def test_a_shape_derived_output_is_a_new_array_every_run():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("ConstantOfShape", ["s"], ["z"],
                          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, None])])
    sess = lf.onnx.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.ones((2, 3), np.float32)
    s, z = sess.run(None, {"x": x})
    s[0], z[0, 0] = 99, 5.0                      # the caller's arrays: writable, not the cache's
    s2, z2 = sess.run(None, {"x": x})
    np.testing.assert_array_equal(s2, [2, 3])
    np.testing.assert_array_equal(z2, np.zeros((2, 3), np.float32))


def test_outputs_never_share_memory_with_the_feeds_or_the_constants():
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["same"]),
         helper.make_node("Reshape", ["x", "flat"], ["view"]),
         helper.make_node("Identity", ["w"], ["weights"]),
         helper.make_node("Add", ["x", "w"], ["sum"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("same", "view", "weights", "sum")],
        initializer=[numpy_helper.from_array(w, "w"),
                     numpy_helper.from_array(np.array([6], np.int64), "flat")])
    sess = lf.onnx.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.ones((2, 3), np.float32)
    outs = sess.run(None, {"x": x})
    for o in outs:
        assert not np.shares_memory(o, x)
        o[...] = -1                                   # the caller's own arrays
    np.testing.assert_array_equal(x, np.ones((2, 3), np.float32))
    same, view, weights, total = sess.run(None, {"x": x})
    np.testing.assert_array_equal(same, x)
    np.testing.assert_array_equal(view, x.reshape(6))
    np.testing.assert_array_equal(weights, w)
    np.testing.assert_array_equal(total, x + w)


def _lstm_graph(weights_fed):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    W = rng.standard_normal((1, 4 * H, I)).astype(np.float32) * 0.3
    R = rng.standard_normal((1, 4 * H, H)).astype(np.float32) * 0.3
    Bb = rng.standard_normal((1, 8 * H)).astype(np.float32) * 0.1
    fed = ["W", "R", "B"] if weights_fed else []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, I])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape))
               for n, a in zip(fed, (W, R, Bb))]
    inits = [] if weights_fed else [numpy_helper.from_array(a, n) for n, a in zip("WRB", (W, R, Bb))]
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=H)],
                              "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), (W, R, Bb)


def test_constant_lstm_weights_are_prepared_once_per_session_with_the_same_bits():
    model, (W, R, Bb) = _lstm_graph(weights_fed=False)
    sess = lf.onnx.load(model)
    x = np.random.default_rng(4).standard_normal((T1, B1, I)).astype(np.float32)
    first = sess.run(None, {"x": x})[0]
    assert len(sess._ctx.packs) == 1
    again = sess.run(None, {"x": x})[0]
    assert len(sess._ctx.packs) == 1
    direct = lf.onnx.lstm(x, W, R, Bb, hidden_size=H)[0]   # the operator, nothing kept
    np.testing.assert_array_equal(first, direct)
    np.testing.assert_array_equal(again, direct)


def test_fed_lstm_weights_are_never_kept():
    model, (W, R, Bb) = _lstm_graph(weights_fed=True)
    sess = lf.onnx.load(model)
    x = np.random.default_rng(5).standard_normal((T1, B1, I)).astype(np.float32)
    for scale in (1.0, 0.5, 2.0):                 # new weights every run: each is used as fed
        got = sess.run(None, {"x": x, "W": W * scale, "R": R, "B": Bb})[0]
        np.testing.assert_array_equal(got, lf.onnx.lstm(x, W * scale, R, Bb, hidden_size=H)[0])
    assert len(sess._ctx.packs) == 0
