"""lf.onnx.load against ONNX Runtime on quantize_dynamic models (DynamicQuantizeLSTM), 1 thread each, median ms of two alternating rounds: python tools/quantized_onnx_speed.py"""
import os, tempfile, time, numpy as np, torch, onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, QuantType
import lstm_fast as lf
lf.set_num_threads(1)
for (T, B, I, H) in [(100, 1, 128, 128), (100, 16, 128, 128), (50, 64, 512, 512)]:
    torch.manual_seed(0)
    m = torch.nn.LSTM(I, H)
    p = os.path.join(tempfile.mkdtemp(), f"s_{T}_{B}_{I}_{H}")
    torch.onnx.export(m, (torch.randn(5, 2, I),), p + ".f.onnx", input_names=["x"], output_names=["y", "h", "c"],
                      dynamic_axes={"x": {0: "T", 1: "B"}}, dynamo=False)
    quantize_dynamic(p + ".f.onnx", p + ".q.onnx", weight_type=QuantType.QInt8)
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    so = ort.SessionOptions(); so.intra_op_num_threads = 1; so.inter_op_num_threads = 1
    s_ort = ort.InferenceSession(p + ".q.onnx", so, providers=["CPUExecutionProvider"])
    s_lf = lf.onnx.load(p + ".q.onnx")
    res = {}
    for name, f in (("ort", lambda: s_ort.run(None, {"x": x})), ("lf", lambda: s_lf.run(None, {"x": x}))) * 2:
        for _ in range(5): f()
        n = max(5, int(0.5 / max(1e-5, (lambda t0: (f(), time.perf_counter() - t0)[1])(time.perf_counter()))))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
        res.setdefault(name, []).append(np.median(ts) * 1e3)
    print((T, B, I, H), "ORT DQLSTM ms", [f"{v:.3f}" for v in res["ort"]], "lf.onnx.load ms", [f"{v:.3f}" for v in res["lf"]],
          f"ratio ORT/lf {min(res['ort'])/min(res['lf']):.2f}")
