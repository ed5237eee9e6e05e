"""The ONNX LSTM operator on lstm_fast's kernels, ONNX model files in and out.

- ``lstm(X, W, R, B, ...)``: the operator itself (opset 7 and later), every attribute.
- ``load(path_or_model)``: a session with ONNX Runtime's calling convention for graphs of LSTM nodes,
  shape arithmetic and simple heads (the operators of ``OPS``).
- ``export(model, path)`` (``LSTM.to_onnx``), ``to_lstm(path_or_model, node=None)`` (``LSTM.from_onnx``)
  and ``lstm_nodes(path_or_model)``: LSTM nodes out of (larger) graphs.

Conversion facts (shared/WEIGHT_LAYOUTS.md, checked in tests against onnx.reference and ONNX
Runtime): ONNX gate blocks are [i, o, f, c], torch's (and the kernels') [i, f, g, o]; B is
[Wb | Rb] (8H); peepholes P are [i, o, f]; Y is (T, D, B, H) for layout 0 and (B, T, D, H) for 1.
"""
from . import _onnx_graph
from ._lstm import LSTM
from ._onnx_graph import (ACTIVATIONS, DIRECTIONS, ONNX_FROM_TORCH, OPS, TORCH_FROM_ONNX, LSTMNode,
                          Session, export, load, lstm, lstm_nodes)


def to_lstm(path_or_model, node=None):
    """An lf.LSTM from an ONNX model (file path, bytes or ModelProto).

    With ``node=None`` the whole graph must be an LSTM: stacked standard LSTM nodes and the
    layout glue that ``export`` and ``torch.onnx.export`` write around them (a Transpose of a
    batch-first input gives ``batch_first=True``; graph inputs x or x, h0, c0). The result is
    checked by running the graph and the LSTM on the same input; a graph that does more (a
    Linear head, a last-step Gather, other operators) raises ValueError naming what would be
    dropped.

    With ``node`` (a node name, one of its output names, or an index of ``lstm_nodes``), that one
    LSTM node is taken out of a larger graph, subgraphs included, as a one-layer lf.LSTM (its
    input and states are then the caller's to give). Standard cells only: peepholes, clip,
    coupled gates, other activations, reverse-only direction, layout=1, constant non-zero
    states or a hidden_size attribute that disagrees with the weights raise ValueError (run such
    models with ``load``).
    """
    return _onnx_graph.to_lstm(path_or_model, node, LSTM)


__all__ = ["lstm", "load", "Session", "export", "to_lstm", "lstm_nodes", "LSTMNode", "OPS"]
