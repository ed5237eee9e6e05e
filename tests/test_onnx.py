"""The ONNX LSTM operator and ONNX model files, against onnx.reference and ONNX Runtime."""
import numpy as np
import pytest
from numpy.testing import assert_allclose

import lstm_fast as lf

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

T, B, I, H = 5, 4, 3, 6
DIRS = {"forward": 1, "reverse": 1, "bidirectional": 2}


def _graph(attrs, inputs, elem=TensorProto.FLOAT):
    node = helper.make_node("LSTM", inputs, ["Y", "Y_h", "Y_c"], hidden_size=H, **attrs)
    ins = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "sequence_lens" else elem, None)
           for n in inputs if n]
    outs = [helper.make_tensor_value_info(n, elem, None) for n in ("Y", "Y_h", "Y_c")]
    return helper.make_model(helper.make_graph([node], "g", ins, outs),
                             opset_imports=[helper.make_opsetid("", 14)])


def _case(direction, dtype=np.float32, seed=0, layout=0):
    D = DIRS[direction]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, I) if layout else (T, B, I)).astype(dtype)
    W = (rng.standard_normal((D, 4 * H, I)) * 0.5).astype(dtype)
    R = (rng.standard_normal((D, 4 * H, H)) * 0.5).astype(dtype)
    bias = (rng.standard_normal((D, 8 * H)) * 0.5).astype(dtype)
    P = (rng.standard_normal((D, 3 * H)) * 0.5).astype(dtype)
    state_shape = (B, D, H) if layout else (D, B, H)
    h0 = rng.standard_normal(state_shape).astype(dtype)
    c0 = rng.standard_normal(state_shape).astype(dtype)
    return dict(X=x, W=W, R=R, B=bias, initial_h=h0, initial_c=c0), P


ATTRIBUTE_CASES = {
    "plain": ({}, False, False),
    "peepholes": ({}, True, False),
    "clip": ({"clip": 0.7}, False, False),
    "input_forget": ({"input_forget": 1}, False, False),
    "activations": ({"activations": ["HardSigmoid", "LeakyRelu", "Softsign"],
                     "activation_alpha": [0.3, 0.05], "activation_beta": [0.4]}, False, False),
    "activations_2": ({"activations": ["Sigmoid", "ScaledTanh", "Elu"],
                       "activation_alpha": [0.8, 1.5], "activation_beta": [1.2]}, False, False),
    "activations_3": ({"activations": ["ThresholdedRelu", "Relu", "Affine"],
                       "activation_alpha": [0.1, 0.9], "activation_beta": [0.2]}, False, False),
    "activations_4": ({"activations": ["Sigmoid", "Softplus", "Tanh"]}, False, False),
    "default_alphas": ({"activations": ["HardSigmoid", "Tanh", "LeakyRelu"]}, False, False),
    "sequence_lens": ({}, False, True),
    "everything": ({"clip": 2.0, "input_forget": 1}, True, True),
}


@pytest.mark.parametrize("direction", list(DIRS))
@pytest.mark.parametrize("case", list(ATTRIBUTE_CASES))
def test_operator_matches_onnxruntime(direction, case):
    ort = pytest.importorskip("onnxruntime")
    attrs, with_p, with_lens = ATTRIBUTE_CASES[case]
    attrs = dict(attrs, direction=direction)
    D = DIRS[direction]
    if "activations" in attrs:   # one triple per direction; the reverse one gets other alphas
        attrs["activations"] = attrs["activations"] * D
        attrs["activation_alpha"] = attrs.get("activation_alpha", []) * D
        attrs["activation_beta"] = attrs.get("activation_beta", []) * D
        if not attrs["activation_alpha"]:
            del attrs["activation_alpha"]
        if not attrs["activation_beta"]:
            del attrs["activation_beta"]
    feeds, P = _case(direction)
    inputs = ["X", "W", "R", "B", "sequence_lens" if with_lens else "", "initial_h", "initial_c"]
    lens = np.array([5, 0, 3, 1], np.int32)
    if with_lens:
        feeds["sequence_lens"] = lens
    if with_p:
        inputs.append("P")
        feeds["P"] = P
    expected = ort.InferenceSession(_graph(attrs, inputs).SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)
    got = lf.onnx.lstm(feeds["X"], feeds["W"], feeds["R"], feeds["B"], feeds.get("sequence_lens"),
                       feeds["initial_h"], feeds["initial_c"], feeds.get("P"), **attrs)
    for name, a, b in zip(("Y", "Y_h", "Y_c"), got, expected):
        assert a.shape == b.shape, name
        assert_allclose(a, b, rtol=1e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("direction", list(DIRS))
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("with_p", [False, True])
def test_operator_matches_onnx_reference_in_float64(direction, layout, with_p):
    feeds, P = _case(direction, np.float64, seed=1, layout=layout)
    inputs = ["X", "W", "R", "B", "", "initial_h", "initial_c"] + (["P"] if with_p else [])
    if with_p:
        feeds["P"] = P
    model = _graph(dict(direction=direction, layout=layout), inputs, TensorProto.DOUBLE)
    expected = ReferenceEvaluator(model).run(None, feeds)
    got = lf.onnx.lstm(feeds["X"], feeds["W"], feeds["R"], feeds["B"], None, feeds["initial_h"],
                       feeds["initial_c"], feeds.get("P"), direction=direction, layout=layout)
    for name, a, b in zip(("Y", "Y_h", "Y_c"), got, expected):
        assert a.shape == b.shape, name
        assert_allclose(a, b, rtol=1e-12, atol=1e-13, err_msg=name)


def test_operator_errors():
    feeds, _ = _case("forward")
    with pytest.raises(ValueError, match="direction must be"):
        lf.onnx.lstm(feeds["X"], feeds["W"], feeds["R"], direction="sideways")
    with pytest.raises(ValueError, match="W has shape"):
        lf.onnx.lstm(feeds["X"], feeds["W"][:, :, :2], feeds["R"])
    with pytest.raises(ValueError, match="activation 'Gelu'"):
        lf.onnx.lstm(feeds["X"], feeds["W"], feeds["R"], activations=["Gelu", "Tanh", "Tanh"])
    with pytest.raises(ValueError, match="sequence_lens must lie"):
        lf.onnx.lstm(feeds["X"], feeds["W"], feeds["R"], sequence_lens=np.array([1, 2, 9, 1]))
    with pytest.raises(TypeError, match="X must be float32 or float64"):
        lf.onnx.lstm(feeds["X"].astype(np.int32), feeds["W"], feeds["R"])


@pytest.mark.parametrize("num_layers, bidirectional, bias", [(1, False, True), (2, True, True), (3, False, False)])
def test_export_runs_in_onnxruntime_and_loads_back(tmp_path, num_layers, bidirectional, bias):
    ort = pytest.importorskip("onnxruntime")
    m = lf.LSTM(4, 7, num_layers=num_layers, bidirectional=bidirectional, bias=bias, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    out, (h_n, c_n) = m(x)
    path = tmp_path / "m.onnx"
    m.to_onnx(path)
    ort_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for a, b in zip((out, h_n, c_n), ort_out):
        assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    sess = lf.onnx.load(path)
    assert [i.name for i in sess.get_inputs()] == ["input"]
    for a, b in zip(sess.run(None, {"input": x}), ort_out):
        assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    (only_h,) = sess.run(["h_n"], {"input": x})
    assert_allclose(only_h, h_n, rtol=1e-5, atol=2e-6)
    back = lf.LSTM.from_onnx(path)
    for k, v in m.state_dict().items():
        assert_allclose(back.state_dict()[k], v, rtol=0, atol=0)


def test_load_runs_single_node_models_with_weights_as_inputs():
    ort = pytest.importorskip("onnxruntime")
    feeds, P = _case("bidirectional")
    feeds["P"] = P
    model = _graph({"direction": "bidirectional", "clip": 1.5},
                   ["X", "W", "R", "B", "", "initial_h", "initial_c", "P"])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = lf.onnx.load(model).run(None, feeds)
    for a, b in zip(got, expected):
        assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_load_errors(tmp_path):
    node = helper.make_node("Conv", ["a", "b"], ["c"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)])
    with pytest.raises(ValueError, match=r"unsupported ONNX operator 'Conv'.*from_onnx\(model, node="):
        lf.onnx.load(helper.make_model(graph))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(ValueError, match="cannot read an ONNX model"):
        lf.onnx.load(bad)
    m = lf.LSTM(3, 4, seed=0)
    sess = lf.onnx.load(m.to_onnx())
    with pytest.raises(ValueError, match="missing input 'input'"):
        sess.run(None, {})
    with pytest.raises(ValueError, match="proj_size"):
        lf.LSTM(3, 4, proj_size=2).to_onnx()
