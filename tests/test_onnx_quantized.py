"""lf.onnx.load of ONNX Runtime's quantize_dynamic output (com.microsoft.DynamicQuantizeLSTM):
the node's own int8 weights and scales on lstm_fast's int8 kernels, against ONNX Runtime."""
import numpy as np
import pytest

import lstm_fast as lf

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
quant = pytest.importorskip("onnxruntime.quantization")


def _quantized(tmp_path, I, H, bidir, per_channel, num_layers=1):
    torch.manual_seed(0)
    m = torch.nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidir)
    f32 = str(tmp_path / "f32.onnx")
    q8 = str(tmp_path / "q8.onnx")
    torch.onnx.export(m, (torch.randn(5, 2, I),), f32, input_names=["x"],
                      output_names=["y", "h", "c"], dynamic_axes={"x": {0: "T", 1: "B"}},
                      dynamo=False)
    quant.quantize_dynamic(f32, q8, weight_type=quant.QuantType.QInt8, per_channel=per_channel)
    return f32, q8


def _ort(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _max_diffs(a, b):
    return [float(np.abs(p - q).max()) for p, q in zip(a, b)]


@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("num_layers,batch", [(1, 1), (2, 3)])
def test_matches_onnx_runtime(tmp_path, bidir, per_channel, num_layers, batch):
    f32, q8 = _quantized(tmp_path, 16, 32, bidir, per_channel, num_layers)
    ops = [n.op_type for n in onnx.load(q8).graph.node]
    assert "DynamicQuantizeLSTM" in ops
    x = np.random.default_rng(1).standard_normal((20, batch, 16)).astype(np.float32)
    ref, flt = _ort(q8, x), _ort(f32, x)
    ours = lf.onnx.load(q8).run(None, {"x": x})
    assert [o.shape for o in ours] == [r.shape for r in ref]
    # both quantize the activations at run time, each its own way: agreement to the size of
    # quantization error (ONNX Runtime's own distance from float32 is 4e-3..8e-3 here)
    ort_err = max(_max_diffs(ref, flt))
    assert max(_max_diffs(ours, ref)) < 2 * ort_err + 1e-3
    assert max(_max_diffs(ours, flt)) < 2 * ort_err + 1e-3
    assert max(_max_diffs(ours, flt)) > 0       # int8 indeed, not the float32 weights


def test_uses_the_nodes_own_scales(tmp_path):
    # doubling W's scale in the file changes ONNX Runtime's answer; ours must follow it
    _, q8 = _quantized(tmp_path, 8, 16, False, False)
    model = onnx.load(q8)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    scale_name = node.input[8]
    init = next(t for t in model.graph.initializer if t.name == scale_name)
    arr = onnx.numpy_helper.to_array(init) * 2
    init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), scale_name))
    changed = str(tmp_path / "changed.onnx")
    onnx.save(model, changed)
    x = np.random.default_rng(2).standard_normal((10, 2, 8)).astype(np.float32)
    before, after = _ort(q8, x), _ort(changed, x)
    assert max(_max_diffs(before, after)) > 0.05
    ours = lf.onnx.load(changed).run(None, {"x": x})
    assert max(_max_diffs(ours, after)) < 0.25 * max(_max_diffs(before, after))


def _node_args(H=8, I=4):
    rng = np.random.default_rng(3)
    return [rng.standard_normal((5, 2, I)).astype(np.float32),
            rng.integers(-127, 128, (1, I, 4 * H)).astype(np.int8),
            rng.integers(-127, 128, (1, H, 4 * H)).astype(np.int8),
            np.zeros((1, 8 * H), np.float32), None, None, None, None,
            np.array([0.01], np.float32), np.array([0], np.int8),
            np.array([0.01], np.float32), np.array([0], np.int8)]


@pytest.mark.parametrize("index,value,error", [
    (1, np.zeros((1, 4, 32), np.float32), TypeError),           # W not int8
    (1, np.zeros((1, 5, 32), np.int8), ValueError),             # W of the wrong input size
    (8, np.array([0.0], np.float32), ValueError),               # a zero scale
    (8, np.array([np.nan], np.float32), ValueError),            # a NaN scale
    (8, np.ones((1, 7), np.float32), ValueError),               # per-channel scale, wrong length
    (9, np.array([-100], np.int8), ValueError),                 # zero point pushes out of int8
    (7, np.zeros((1, 24), np.float32), ValueError),             # peepholes
])
def test_bad_nodes_are_refused(index, value, error):
    op = lf.onnx.OPS[("com.microsoft", "DynamicQuantizeLSTM")]
    args = _node_args()
    args[index] = value
    with pytest.raises(error):
        op(args, {"hidden_size": 8}, None)


def test_reverse_direction_is_refused():
    op = lf.onnx.OPS[("com.microsoft", "DynamicQuantizeLSTM")]
    with pytest.raises(ValueError, match="direction"):
        op(_node_args(), {"hidden_size": 8, "direction": b"reverse"}, None)


def test_sequence_lens_and_states_as_each_sequence_alone():
    # padded batch with initial states: each sequence's outputs are those of it run alone, cut
    # to its length (the int8 kernels' rows do not depend on the batch), the padded rows zero
    op = lf.onnx.OPS[("com.microsoft", "DynamicQuantizeLSTM")]
    args = _node_args()
    rng = np.random.default_rng(4)
    args[5] = rng.standard_normal((1, 2, 8)).astype(np.float32)
    args[6] = rng.standard_normal((1, 2, 8)).astype(np.float32)
    args[4] = np.array([3, 5], np.int32)
    Y, h, c = op(args, {"hidden_size": 8}, None)
    assert Y.shape == (5, 1, 2, 8) and h.shape == c.shape == (1, 2, 8)
    for b, n in enumerate((3, 5)):
        alone = list(args)
        alone[0] = args[0][:n, b:b + 1]
        alone[4] = None
        alone[5], alone[6] = args[5][:, b:b + 1], args[6][:, b:b + 1]
        Ya, ha, ca = op(alone, {"hidden_size": 8}, None)
        np.testing.assert_array_equal(Y[:n, :, b], Ya[:, :, 0])
        np.testing.assert_array_equal(Y[n:, :, b], 0)
        np.testing.assert_array_equal(h[:, b], ha[:, 0])
        np.testing.assert_array_equal(c[:, b], ca[:, 0])


def test_one_scale_serves_both_directions_and_packs_once_per_session(tmp_path):
    op = lf.onnx.OPS[("com.microsoft", "DynamicQuantizeLSTM")]
    args = _node_args()
    rng = np.random.default_rng(5)
    args[1] = rng.integers(-127, 128, (2, 4, 32)).astype(np.int8)
    args[2] = rng.integers(-127, 128, (2, 8, 32)).astype(np.int8)
    args[3] = np.zeros((2, 64), np.float32)
    per_dir = list(args)
    per_dir[8] = per_dir[10] = np.array([0.01, 0.01], np.float32)
    per_dir[9] = per_dir[11] = np.array([0, 0], np.int8)
    attrs = {"hidden_size": 8, "direction": b"bidirectional"}
    for a, b in zip(op(args, attrs, None), op(per_dir, attrs, None)):
        np.testing.assert_array_equal(a, b)
    _, q8 = _quantized(tmp_path, 8, 16, True, False)
    session = lf.onnx.load(q8)
    x = np.zeros((3, 2, 8), np.float32)
    first = session.run(None, {"x": x})
    assert len(session._ctx.packs) == 1
    for a, b in zip(session.run(None, {"x": x}), first):
        np.testing.assert_array_equal(a, b)
    assert len(session._ctx.packs) == 1
