"""No public call writes into an array it was given, every call accepts read-only arrays, and no
returned array aliases an argument, a model's live parameters or an earlier call's result (issue 14).

`test_every_public_entry_point_is_covered` enumerates the public API (lstm_fast.__all__ and the
public names of its submodules, with every public method of every public class): a new public
function without a case in CASES fails it. Each case runs twice, once with read-only arguments and
once with writable ones; every argument is compared bitwise with its copy taken before the call.
"""
import dataclasses
import inspect
import io
import os

import numpy as np
import pytest

import lstm_fast as lf
import lstm_fast.reference

SUBMODULES = (lf.nn, lf.optim, lf.onnx, lf.dask, lf.reference)


def _arrays_in(obj):
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _arrays_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _arrays_in(o)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _arrays_in(getattr(obj, f.name))


class Ctx:
    """Hands out the call's arguments (read-only or writable), remembers their bits, and checks
    results for aliasing."""

    def __init__(self, readonly):
        self.readonly = readonly
        self.args = []
        self.models = []

    def arr(self, a, dtype=None):
        a = np.array(a, dtype=dtype)
        if self.readonly:
            a.flags.writeable = False
        self.args.append((a, a.copy()))
        return a

    def rand(self, *shape, dtype=np.float32, seed=0):
        return self.arr(np.random.default_rng(seed + len(self.args)).standard_normal(shape), dtype)

    def watch(self, model):
        """A model (LSTM, LSTMCell, Linear) whose live parameters no result may alias."""
        self.models.append(model)
        return model

    def fresh(self, result, allowed=()):
        """No array of `result` shares memory with an argument or a watched model's parameters
        (except the arrays in `allowed`)."""
        for out in _arrays_in(result):
            if any(out is a for a in allowed):
                continue
            for a, _ in self.args:
                assert not np.shares_memory(out, a), "a result aliases an argument"
            for m in self.models:
                for name, p in m.parameters().items():
                    assert not np.shares_memory(out, p), f"a result aliases the live parameter {name}"
        return result

    def twice(self, call, same=True):
        """Call twice: the second result equals the first bit for bit (when `same`) and neither
        aliases the other."""
        first = self.fresh(call())
        kept = [a.copy() for a in _arrays_in(first)]
        second = self.fresh(call())
        for a, b in zip(_arrays_in(first), kept):
            assert a.tobytes() == b.tobytes(), "the second call changed the first call's result"
        for a in _arrays_in(first):
            for b in _arrays_in(second):
                assert not np.shares_memory(a, b), "two calls return the same memory"
        if same:
            for a, b in zip(_arrays_in(first), _arrays_in(second)):
                assert a.tobytes() == b.tobytes(), "the second call gives another answer"
        return second

    def verify(self):
        for a, before in self.args:
            assert a.dtype == before.dtype and a.shape == before.shape
            assert a.tobytes() == before.tobytes(), f"an argument of shape {a.shape} was modified"
            if self.readonly:
                assert not a.flags.writeable


CASES = {}


def case(*names):
    def register(fn):
        for name in names:
            CASES[name] = fn
        return fn
    return register


# ------------------------------------------------------------------------ LSTM and FrozenLSTM
CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(batch_first=True, proj_size=3),
           dict(dtype=np.float64, bias=False)]


def _lstms(ctx, frozen):
    for cfg in CONFIGS:
        m = lf.LSTM(4, 5, seed=0, **cfg)
        yield ctx.watch(m.freeze() if frozen else m)
        if frozen and m.dtype == np.float32:     # reduced precision (issue 16): the same rules
            for precision in ("bfloat16", "int8"):
                yield ctx.watch(m.freeze(precision=precision))


def _call_cases(ctx, frozen, method):
    for m in _lstms(ctx, frozen):
        call = getattr(m, method)
        n, D, H_out = m.num_layers * m.num_directions, m.num_directions, m.hidden_out
        x = ctx.rand(3, 6, 4, dtype=m.dtype)        # (T, B, I) or (B, T, I): T=B=3 or 6
        B = 6 if not m.batch_first else 3
        h0, c0 = ctx.rand(n, B, H_out, dtype=m.dtype), ctx.rand(n, B, 5, dtype=m.dtype)
        T = 3 if not m.batch_first else 6
        lengths = ctx.arr(np.arange(B) % T + 1)
        ctx.twice(lambda: call(x))
        ctx.twice(lambda: call(x, (h0, c0)))
        ctx.twice(lambda: call(x, (h0, c0), lengths))
        x16 = ctx.rand(3, 4, dtype=np.float16)
        ctx.twice(lambda: call(x16))                                    # unbatched, converted
        ctx.twice(lambda: call(x[..., ::-1][..., ::-1], (h0[:, :, :], c0)))   # views


@case("lstm_fast.LSTM.__call__", "lstm_fast.LSTM.forward")
def _lstm_call(ctx):
    _call_cases(ctx, False, "__call__")
    _call_cases(ctx, False, "forward")


@case("lstm_fast.FrozenLSTM.__call__", "lstm_fast.FrozenLSTM.forward")
def _frozen_call(ctx):
    _call_cases(ctx, True, "__call__")
    _call_cases(ctx, True, "forward")


@case("lstm_fast.LSTM", "lstm_fast.LSTM.num_parameters", "lstm_fast.LSTM.reset_parameters",
      "lstm_fast.FrozenLSTM.num_parameters")
def _lstm_plain(ctx):
    m = lf.LSTM(3, 4, seed=1)
    before = m.state_dict()
    m.reset_parameters(1)
    assert all(np.array_equal(before[k], p) for k, p in m.parameters().items())
    assert m.num_parameters() == m.freeze().num_parameters() == sum(p.size for p in before.values())


@case("lstm_fast.FrozenLSTM", "lstm_fast.FrozenLSTM.load_state_dict",
      "lstm_fast.FrozenLSTM.reset_parameters", "lstm_fast.FrozenLSTM.forward_train",
      "lstm_fast.FrozenLSTM.backward")
def _frozen_refusals(ctx):
    with pytest.raises(TypeError):
        lf.FrozenLSTM(3, 4)
    f = lf.LSTM(3, 4, seed=0).freeze()
    sd = {k: ctx.arr(v) for k, v in f.state_dict().items()}
    with pytest.raises(TypeError):
        f.load_state_dict(sd)
    with pytest.raises(TypeError):
        f.reset_parameters(0)
    x = ctx.rand(2, 2, 3)
    with pytest.raises(TypeError):
        f.forward_train(x)
    with pytest.raises(TypeError):
        f.backward(None, x)


@case("lstm_fast.LSTM.parameters", "lstm_fast.FrozenLSTM.parameters")
def _parameters_are_documented_live_views(ctx):
    m = lf.LSTM(3, 4, seed=0)
    for model in (m, m.freeze()):
        assert "live views" in type(model).parameters.__doc__
        assert all(p.base is not None for p in model.parameters().values())
    assert not any(p.flags.writeable for p in m.freeze().parameters().values())


@case("lstm_fast.LSTM.state_dict", "lstm_fast.FrozenLSTM.state_dict", "lstm_fast.LSTM.freeze",
      "lstm_fast.FrozenLSTM.freeze")
def _state_dict(ctx):
    for m in _lstms(ctx, False):
        ctx.twice(m.state_dict)
        f = m.freeze()
        for name, p in f.parameters().items():
            assert not np.shares_memory(p, m.parameters()[name])
        ctx.twice(ctx.watch(f).state_dict)
        assert f.freeze() is f


@case("lstm_fast.LSTM.load_state_dict")
def _load_state_dict(ctx):
    for m in _lstms(ctx, False):
        src = lf.LSTM(**{k: getattr(m, k) for k in lf._io.CONFIG_KEYS}, dtype=m.dtype, seed=5)
        sd = {k: ctx.arr(v) for k, v in src.state_dict().items()}
        sd32 = {k: ctx.arr(v, np.float32) for k, v in src.state_dict().items()}   # converted
        for given in (sd, sd32):
            m.load_state_dict(given)
            for name, p in m.parameters().items():
                assert not np.shares_memory(p, given[name])


def _train_cases(ctx, m, method):
    n, H_out = m.num_layers * m.num_directions, m.hidden_out
    B, T = (6, 3) if not m.batch_first else (3, 6)
    x = ctx.rand(3, 6, 4, dtype=m.dtype)
    h0, c0 = ctx.rand(n, B, H_out, dtype=m.dtype), ctx.rand(n, B, 5, dtype=m.dtype)
    lengths = ctx.arr(np.arange(B) % T + 1)
    out, _, cache = m.forward_train(x, (h0, c0), lengths)
    ctx.fresh(out)
    ctx.fresh([cache.x, cache.h0, cache.c0] + cache.layer_outputs)
    if method == "forward_train":
        ctx.twice(lambda: m.forward_train(x, (h0, c0), lengths)[:2], same=m.dropout == 0)
        return
    g_out = ctx.rand(*out.shape, dtype=m.dtype)
    g_h, g_c = ctx.rand(n, B, H_out, dtype=m.dtype), ctx.rand(n, B, 5, dtype=m.dtype)
    ctx.twice(lambda: m.backward(cache, g_out, (g_h, g_c)))
    ctx.twice(lambda: m.backward(cache, g_out))


@case("lstm_fast.LSTM.forward_train")
def _forward_train(ctx):
    for m in _lstms(ctx, False):
        _train_cases(ctx, m, "forward_train")


@case("lstm_fast.LSTM.backward")
def _backward(ctx):
    for m in _lstms(ctx, False):
        _train_cases(ctx, m, "backward")


@case("lstm_fast.LSTM.zero_state", "lstm_fast.FrozenLSTM.zero_state")
def _zero_state(ctx):
    m = ctx.watch(lf.LSTM(3, 4, num_layers=2, seed=0))
    ctx.twice(lambda: m.zero_state(2))
    ctx.twice(lambda: ctx.watch(m.freeze()).zero_state())


@case("lstm_fast.LSTM.step", "lstm_fast.FrozenLSTM.step")
def _step(ctx):
    for frozen in (False, True):
        for cfg in (dict(num_layers=2), dict(proj_size=2, dtype=np.float64), dict(batch_first=True)):
            m = lf.LSTM(3, 4, seed=0, **cfg)
            models = [m.freeze()] if frozen else [m]
            if frozen and m.dtype == np.float32:
                models += [m.freeze(precision=p) for p in ("bfloat16", "int8")]
            for m in models:
                _step_model(ctx, ctx.watch(m))


def _step_model(ctx, m):
    if True:
        if True:
            x = ctx.rand(2, 3, dtype=m.dtype)
            h, c = ctx.rand(m.num_layers, 2, m.hidden_out, dtype=m.dtype), \
                ctx.rand(m.num_layers, 2, 4, dtype=m.dtype)
            y, (h1, c1) = ctx.twice(lambda: m.step(x, (h, c)))
            assert np.shares_memory(y, h1)    # documented: y_t is a view of the new h[-1]
            ctx.twice(lambda: m.step(x[0], (h[:, 0], c[:, 0])))
            x16 = ctx.rand(2, 3, dtype=np.float16)
            ctx.twice(lambda: m.step(x16, (h, c)))


@case("lstm_fast.LSTM.save", "lstm_fast.FrozenLSTM.save", "lstm_fast.load")
def _save_load(ctx, tmp_path):
    for m in _lstms(ctx, False):
        models = [m, ctx.watch(m.freeze())]
        if m.dtype == np.float32:
            models.append(ctx.watch(m.freeze(precision="int8")))
        for model in models:
            for suffix in (".npz", ".safetensors"):
                if suffix == ".safetensors":
                    pytest.importorskip("safetensors")
                path = tmp_path / f"m{suffix}"
                model.save(path)
                got = ctx.watch(lf.load(path))
                assert all(np.array_equal(p, got.parameters()[k]) for k, p in model.parameters().items())
                # a float32 file loads as an LSTM; a reduced-precision one as its FrozenLSTM
                reduced = getattr(model, "precision", "float32") != "float32"
                for p in got.parameters().values():
                    assert p.flags.writeable != reduced


@case("lstm_fast.LSTM.to_onnx", "lstm_fast.FrozenLSTM.to_onnx", "lstm_fast.onnx.export",
      "lstm_fast.LSTM.from_onnx", "lstm_fast.FrozenLSTM.from_onnx", "lstm_fast.onnx.to_lstm")
def _onnx_files(ctx):
    pytest.importorskip("onnx")
    m = ctx.watch(lf.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0))
    before = m.state_dict()
    proto = m.to_onnx()
    lf.onnx.export(m.freeze())
    assert all(np.array_equal(before[k], p) for k, p in m.parameters().items())
    data = proto.SerializeToString()
    for read in (lf.LSTM.from_onnx, lf.FrozenLSTM.from_onnx, lf.onnx.to_lstm):
        got = read(proto)
        got2 = read(proto)
        for name, p in got.parameters().items():
            assert p.flags.writeable and not np.shares_memory(p, got2.parameters()[name])
    assert proto.SerializeToString() == data


@case("lstm_fast.LSTM.from_torch", "lstm_fast.FrozenLSTM.from_torch")
def _from_torch(ctx):
    torch = pytest.importorskip("torch")
    t = torch.nn.LSTM(3, 4, num_layers=2)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    for read in (lf.LSTM.from_torch, lf.FrozenLSTM.from_torch):
        m = ctx.watch(read(t))
        m.reset_parameters(3)        # writing into our model must not reach torch's tensors
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    return keras


@case("lstm_fast.LSTM.from_keras", "lstm_fast.FrozenLSTM.from_keras", "KerasLSTM.__call__")
def _from_keras(ctx):
    keras = _keras()
    keras.utils.set_random_seed(0)
    for layer in (keras.layers.LSTM(4, return_sequences=True, return_state=True),
                  keras.layers.Bidirectional(keras.layers.LSTM(4, return_state=True))):
        layer.build((None, 5, 3))
        before = [np.array(w) for w in layer.get_weights()]
        conv = lf.LSTM.from_keras(layer)
        lf.FrozenLSTM.from_keras(layer)
        ctx.watch(conv.model)
        x = ctx.rand(2, 5, 3)
        n_dirs = 2 if type(layer).__name__ == "Bidirectional" else 1
        states = [ctx.rand(2, 4) for _ in range(2 * n_dirs)]
        ctx.twice(lambda: conv(x))
        ctx.twice(lambda: conv(x, initial_state=states))
        mask = ctx.arr(np.arange(5)[None, :] < np.array([[5], [2]]))
        ctx.twice(lambda: conv(x, initial_state=states, mask=mask))
        conv.model.reset_parameters(1)
        assert all(np.array_equal(a, np.array(b)) for a, b in zip(before, layer.get_weights()))


# ------------------------------------------------------------------------ LSTMCell, nn
@case("lstm_fast.LSTMCell", "lstm_fast.LSTMCell.__call__", "lstm_fast.LSTMCell.forward",
      "lstm_fast.LSTMCell.parameters", "lstm_fast.LSTMCell.state_dict",
      "lstm_fast.LSTMCell.load_state_dict", "lstm_fast.LSTMCell.reset_parameters")
def _cell(ctx):
    for dtype in (np.float32, np.float64):
        cell = ctx.watch(lf.LSTMCell(3, 4, dtype=dtype, seed=0))
        x, h, c = ctx.rand(2, 3, dtype=dtype), ctx.rand(2, 4, dtype=dtype), ctx.rand(2, 4, dtype=dtype)
        ctx.twice(lambda: cell(x, (h, c)))
        ctx.twice(lambda: cell.forward(x[0], (h[0], c[0])))
        ctx.twice(lambda: cell(x))
        ctx.twice(cell.state_dict)
        assert "live views" in cell.parameters.__doc__
        sd = {k: ctx.arr(v) for k, v in lf.LSTMCell(3, 4, dtype=dtype, seed=1).state_dict().items()}
        cell.load_state_dict(sd)
        for name, p in cell.parameters().items():
            assert not np.shares_memory(p, sd[name])
        cell.reset_parameters(2)


@case("lstm_fast.Linear", "lstm_fast.nn.Linear", "lstm_fast.Linear.__call__",
      "lstm_fast.Linear.forward", "lstm_fast.Linear.backward", "lstm_fast.Linear.parameters",
      "lstm_fast.Linear.state_dict", "lstm_fast.Linear.load_state_dict",
      "lstm_fast.nn.LinearGradients", "lstm_fast.nn.Linear.__call__", "lstm_fast.nn.Linear.forward",
      "lstm_fast.nn.Linear.backward", "lstm_fast.nn.Linear.parameters",
      "lstm_fast.nn.Linear.state_dict", "lstm_fast.nn.Linear.load_state_dict")
def _linear(ctx):
    for bias in (True, False):
        head = ctx.watch(lf.Linear(4, 3, bias=bias, seed=0))
        x, g = ctx.rand(2, 5, 4), ctx.rand(2, 5, 3)
        ctx.twice(lambda: head(x))
        ctx.twice(lambda: head.forward(x[0, 0]))
        ctx.twice(lambda: head.backward(x, g))
        ctx.twice(head.state_dict)
        assert "Live views" in head.parameters.__doc__
        sd = {k: ctx.arr(v) for k, v in lf.Linear(4, 3, bias=bias, seed=1).state_dict().items()}
        head.load_state_dict(sd)
        for name, p in head.parameters().items():
            assert not np.shares_memory(p, sd[name])


@case("lstm_fast.mse_loss", "lstm_fast.nn.mse_loss", "lstm_fast.cross_entropy_loss",
      "lstm_fast.nn.cross_entropy_loss")
def _losses(ctx):
    pred, target = ctx.rand(4, 3), ctx.rand(4, 3)
    ctx.twice(lambda: lf.mse_loss(pred, target))
    target64 = ctx.rand(4, 3, dtype=np.float64)
    ctx.twice(lambda: lf.mse_loss(pred, target64))
    labels = ctx.arr(np.array([0, 2, 1, 2]))
    ctx.twice(lambda: lf.cross_entropy_loss(pred, labels))


@case("lstm_fast.Gradients", "lstm_fast.TrainCache")
def _containers(ctx):
    # dataclasses holding what forward_train/backward made: constructing one keeps the arrays
    # given (that is what a container is for) and writes nothing
    a = ctx.rand(2, 3)
    g = lf.Gradients(a, (a, a), {"w": a})
    assert g.input is a
    fields = [f.name for f in dataclasses.fields(lf.TrainCache)]
    lf.TrainCache(**{name: a for name in fields})


# ------------------------------------------------------------------------ optim, fit
def _grads(ctx, params):
    return {k: ctx.rand(*p.shape, dtype=p.dtype) for k, p in params.items()}


@case("lstm_fast.optim.SGD", "lstm_fast.optim.SGD.step", "lstm_fast.optim.Adam",
      "lstm_fast.optim.Adam.step", "lstm_fast.optim.AdamW", "lstm_fast.optim.AdamW.step",
      "lstm_fast.optim.Optimizer", "lstm_fast.optim.Optimizer.step",
      "lstm_fast.optim.Optimizer.state_dict", "lstm_fast.optim.Optimizer.load_state_dict",
      "lstm_fast.optim.SGD.state_dict", "lstm_fast.optim.SGD.load_state_dict",
      "lstm_fast.optim.Adam.state_dict", "lstm_fast.optim.Adam.load_state_dict",
      "lstm_fast.optim.AdamW.state_dict", "lstm_fast.optim.AdamW.load_state_dict",
      *(f"lstm_fast.optim.{c}.{m}" for c in ("Optimizer", "SGD", "Adam", "AdamW")
        for m in ("check_state_dict", "state_shapes")))
def _optim(ctx):
    for make in (lambda p: lf.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True),
                 lambda p: lf.optim.Adam(p, weight_decay=0.1), lf.optim.AdamW):
        m = lf.LSTM(3, 4, seed=0)
        opt = make([m.parameters()])
        grads = [_grads(ctx, m.parameters())]
        opt.step(grads)
        opt.step(grads)
        state = ctx.twice(opt.state_dict)
        for s in _arrays_in(state):
            assert not any(np.shares_memory(s, t) for t in opt.state.values())
        given = {k: ctx.arr(v) for k, v in state.items()}
        other = make([lf.LSTM(3, 4, seed=0).parameters()])
        assert set(other.state_shapes()) >= set(given)
        other.check_state_dict(given)
        other.load_state_dict(given)
        for s in other.state.values():
            assert s.flags.writeable and not any(np.shares_memory(s, a) for a in given.values())
    with pytest.raises(ValueError, match="read-only"):
        lf.optim.Adam(lf.LSTM(3, 4).freeze().parameters())
    with pytest.raises(AttributeError):   # the base class has no update rule
        lf.optim.Optimizer(lf.LSTM(3, 4).parameters(), lr=0.1).step(
            [_grads(ctx, lf.LSTM(3, 4).parameters())])


@case("lstm_fast.optim.clip_grad_norm")
def _clip(ctx):
    # documented to scale the gradients in place: read-only ones are refused clearly, and the
    # writable ones it was given are its output (not compared)
    grads = {"a": ctx.rand(3, 4)}
    if ctx.readonly:
        with pytest.raises(ValueError, match="in place"):
            lf.optim.clip_grad_norm(grads, 0.1)
    else:
        own = {"a": grads["a"].copy()}
        norm = lf.optim.clip_grad_norm(own, 0.1)
        assert norm > 0.1 and np.isclose(np.linalg.norm(own["a"]), 0.1, rtol=1e-5)


@case("lstm_fast.fit", "lstm_fast.save_checkpoint", "lstm_fast.load_checkpoint")
def _fit(ctx, tmp_path):
    for batch_first in (False, True):
        m = lf.LSTM(3, 4, batch_first=batch_first, seed=0)
        head = lf.Linear(4, 2, seed=0)
        x, y = ctx.rand(10, 5, 3), ctx.rand(10, 2)
        val = (ctx.rand(4, 5, 3), ctx.rand(4, 2))
        lf.fit(m, head, x, y, epochs=2, batch_size=4, validation=val, patience=1, progress=False)
        labels = ctx.arr(np.arange(10) % 2)
        lf.fit(m, head, x, labels, epochs=1, batch_size=4, loss="cross_entropy", progress=False)
        opt = lf.optim.Adam([m.parameters(), head.parameters()])
        lf.save_checkpoint(tmp_path / "c.npz", m, head, opt)
        m2, head2 = ctx.watch(lf.LSTM(3, 4, batch_first=batch_first)), ctx.watch(lf.Linear(4, 2))
        lf.load_checkpoint(tmp_path / "c.npz", m2, head2, lf.optim.Adam([m2.parameters(), head2.parameters()]))


# ------------------------------------------------------------------------ threads, config
@case("lstm_fast.LSTMCell.from_torch")
def _cell_from_torch(ctx):
    torch = pytest.importorskip("torch")
    cell = torch.nn.LSTMCell(3, 4)
    before = {k: t.detach().clone() for k, t in cell.state_dict().items()}
    ours = lf.LSTMCell.from_torch(cell)
    for k, t in cell.state_dict().items():
        assert torch.equal(t, before[k])
        assert not np.shares_memory(ours.parameters()[k], t.detach().numpy())


@case("lstm_fast.onnx.lstm_nodes", "lstm_fast.onnx.LSTMNode")
def _lstm_nodes(ctx):
    proto = _lstm_graph()
    data = proto.SerializeToString()
    nodes = lf.onnx.lstm_nodes(proto)
    assert nodes and all(isinstance(n, lf.onnx.LSTMNode) for n in nodes)
    assert proto.SerializeToString() == data


@case("lstm_fast.get_num_threads", "lstm_fast.set_num_threads", "lstm_fast.threads",
      "lstm_fast.show_config")
def _no_arrays(ctx):
    n = lf.get_num_threads()
    with lf.threads(1):
        assert lf.get_num_threads() == 1
    lf.set_num_threads(n)
    lf._threads._global_threads = None   # back to following the OpenMP runtime, as before
    buf = io.StringIO()
    try:
        lf.show_config(file=buf)
    except TypeError:
        lf.show_config()


# ------------------------------------------------------------------------ dask
@case("lstm_fast.dask.predict")
def _dask(ctx):
    da = pytest.importorskip("dask.array")
    for batch_first in (False, True):
        m = ctx.watch(lf.LSTM(3, 4, batch_first=batch_first, seed=0))
        x = ctx.rand(6, 4, 3)
        got = lf.dask.predict(m, da.from_array(x, chunks=2)).compute(scheduler="sync")
        ctx.fresh(got)
        np.testing.assert_array_equal(got, m(x)[0])


# ------------------------------------------------------------------------ onnx
def _onnx_args(ctx, direction, layout, dtype=np.float32, peep=True):
    D, H, I, T, B = (2 if direction == "bidirectional" else 1), 4, 3, 5, 2
    X = ctx.rand(*((B, T, I) if layout else (T, B, I)), dtype=dtype)
    W, R, Bias = ctx.rand(D, 4 * H, I, dtype=dtype), ctx.rand(D, 4 * H, H, dtype=dtype), \
        ctx.rand(D, 8 * H, dtype=dtype)
    seq = ctx.arr(np.array([5, 3], np.int32))
    st = (B, D, H) if layout else (D, B, H)
    h0, c0 = ctx.rand(*st, dtype=dtype), ctx.rand(*st, dtype=dtype)
    P = ctx.rand(D, 3 * H, dtype=dtype) if peep else None
    return X, W, R, Bias, seq, h0, c0, P


@case("lstm_fast.onnx.lstm")
def _onnx_lstm(ctx):
    for direction in ("forward", "reverse", "bidirectional"):
        for layout in (0, 1):
            for dtype in (np.float32, np.float64):
                args = _onnx_args(ctx, direction, layout, dtype)
                ctx.twice(lambda: lf.onnx.lstm(*args, direction=direction, layout=layout))
    args = _onnx_args(ctx, "bidirectional", 0, peep=False)
    ctx.twice(lambda: lf.onnx.lstm(*args, direction="bidirectional", clip=2.0,
                                   activations=["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Tanh", "Tanh"]))


def _lstm_graph(with_states_as_initializers=False, identity=True):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    H, I = 4, 3
    inits = [numpy_helper.from_array(rng.standard_normal((1, 4 * H, I)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R")]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", I])]
    if with_states_as_initializers:
        inits += [numpy_helper.from_array(rng.standard_normal((1, 2, H)).astype(np.float32), n)
                  for n in ("h0", "c0")]
    else:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "B", H]) for n in ("h0", "c0")]
    nodes = [helper.make_node("LSTM", ["X", "W", "R", "", "", "h0", "c0"], ["Y", "Y_h", "Y_c"],
                              hidden_size=H)]
    outs = ["Y", "Y_h", "Y_c"]
    if identity:
        nodes.append(helper.make_node("Identity", ["X"], ["X_out"]))
        outs.append("X_out")
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


@case("lstm_fast.onnx.load", "lstm_fast.onnx.Session", "lstm_fast.onnx.Session.run",
      "lstm_fast.onnx.Session.get_inputs", "lstm_fast.onnx.Session.get_outputs")
def _onnx_session(ctx):
    pytest.importorskip("onnx")
    proto = _lstm_graph()
    sess = lf.onnx.load(proto)
    lf.onnx.Session(proto)
    assert [i.name for i in sess.get_inputs()] == ["X", "h0", "c0"]
    assert len(sess.get_outputs()) == 4
    feed = {"X": ctx.rand(5, 2, 3), "h0": ctx.rand(1, 2, 4), "c0": ctx.rand(1, 2, 4)}
    ctx.twice(lambda: sess.run(None, feed))
    init = {k: v.copy() for k, v in sess._consts.items()}
    proto2 = _lstm_graph(with_states_as_initializers=True)
    sess2 = lf.onnx.load(proto2)
    init2 = {k: v.copy() for k, v in sess2._consts.items()}
    ctx.twice(lambda: sess2.run(None, {"X": feed["X"]}))
    for s, kept in ((sess, init), (sess2, init2)):
        assert all(v.tobytes() == kept[k].tobytes() for k, v in s._consts.items())


# ------------------------------------------------------------------------ reference
@case("lstm_fast.reference.sigmoid", "lstm_fast.reference.cell_step", "lstm_fast.reference.lstm")
def _reference(ctx):
    m = lf.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    params = {k: ctx.arr(v) for k, v in m.state_dict().items()}
    x, h0, c0 = ctx.rand(5, 2, 3, dtype=np.float64), ctx.rand(4, 2, 4, dtype=np.float64), \
        ctx.rand(4, 2, 4, dtype=np.float64)
    lengths = ctx.arr(np.array([5, 2]))
    ctx.twice(lambda: lf.reference.lstm(x, params, 2, True, h0, c0, lengths))
    ctx.twice(lambda: lf.reference.lstm(x, params, 2, True))
    ctx.twice(lambda: lf.reference.sigmoid(x))
    p = [params[n + "_l0"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    ctx.twice(lambda: lf.reference.cell_step(x[0], h0[0], c0[0], *p))


# ------------------------------------------------------------------------ the walk
def _public_api():
    names = set()
    sources = [(lf, lf.__all__)] + [(mod, getattr(mod, "__all__", None)) for mod in SUBMODULES]
    for mod, public in sources:
        if public is None:
            public = [n for n in dir(mod) if not n.startswith("_")
                      and getattr(getattr(mod, n), "__module__", None) == mod.__name__]
        for n in public:
            obj = getattr(mod, n)
            if inspect.ismodule(obj) or not callable(obj):
                continue
            if not str(getattr(obj, "__module__", "")).startswith("lstm_fast"):
                continue
            qual = f"{mod.__name__}.{n}"
            names.add(qual)
            if inspect.isclass(obj):
                for attr in dir(obj):
                    if attr.startswith("_") and attr != "__call__":
                        continue
                    if attr == "__call__" and "__call__" not in {k for c in obj.__mro__[:-1] for k in vars(c)}:
                        continue
                    member = inspect.getattr_static(obj, attr)
                    if isinstance(member, property) or not callable(getattr(obj, attr)):
                        continue
                    names.add(f"{qual}.{attr}")
    return names


def test_every_public_entry_point_is_covered():
    missing = sorted(_public_api() - set(CASES))
    assert not missing, f"public entry points without an immutability case: {missing}"


@pytest.mark.parametrize("readonly", [True, False], ids=["read-only", "writable"])
@pytest.mark.parametrize("name", sorted(set(CASES.values()), key=lambda f: f.__name__),
                         ids=lambda f: f.__name__.strip("_"))
def test_arguments_are_never_modified(name, readonly, tmp_path):
    fn = name
    ctx = Ctx(readonly)
    if "tmp_path" in inspect.signature(fn).parameters:
        fn(ctx, tmp_path)
    else:
        fn(ctx)
    ctx.verify()


# ------------------------------------------------------------------------ regressions (issue 14)
def _ort():
    ort = pytest.importorskip("onnxruntime")
    return ort


def _ort_lstm(X, W, R, B, seq, h0, c0, P, direction):
    from onnx import TensorProto, helper

    ort = _ort()
    names = ["X", "W", "R", "B", "seq", "h0", "c0", "P"]
    arrays = [X, W, R, B, seq, h0, c0, P]
    present = [n if a is not None else "" for n, a in zip(names, arrays)]
    H = R.shape[-1]
    node = helper.make_node("LSTM", present, ["Y", "Y_h", "Y_c"], hidden_size=H, direction=direction)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "seq" else TensorProto.FLOAT,
                                            list(a.shape)) for n, a in zip(names, arrays) if a is not None]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("Y", "Y_h", "Y_c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a for n, a in zip(names, arrays) if a is not None})


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("peepholes", [False, True])
def test_onnx_lstm_twice_with_the_same_initial_state_matches_onnxruntime(direction, peepholes):
    pytest.importorskip("onnx")
    ctx = Ctx(readonly=False)
    X, W, R, B, seq, h0, c0, P = _onnx_args(ctx, direction, 0, peep=peepholes)
    expected = _ort_lstm(X, W, R, B, seq, h0, c0, P, direction)
    for _ in range(2):
        got = lf.onnx.lstm(X, W, R, B, seq, h0, c0, P, direction=direction)
        assert not np.shares_memory(got[1], h0) and not np.shares_memory(got[2], c0)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ctx.verify()
    h0.flags.writeable = c0.flags.writeable = False      # read-only states are accepted
    got = lf.onnx.lstm(X, W, R, B, seq, h0, c0, P, direction=direction)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_onnx_backend_lstm_with_peepholes_twice():
    # the ONNX backend test case test_lstm_with_peepholes (onnx/backend/test/case/node/lstm.py):
    # inputs all 1 / 0.1 weights / peepholes, initial states zeros given as inputs; run twice
    # through lf.onnx.load(...).run with the same feed, checked against ONNX Runtime
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    X = np.array([[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]], np.float32)
    I, H, B = 4, 3, 2
    W = np.full((1, 4 * H, I), 0.2, np.float32)
    R = np.full((1, 4 * H, H), 0.1, np.float32)
    Bias = np.zeros((1, 8 * H), np.float32)
    seq = np.repeat(X.shape[0], B).astype(np.int32)
    h0 = np.zeros((1, B, H), np.float32)
    c0 = np.zeros((1, B, H), np.float32)
    P = np.full((1, 3 * H), 0.1, np.float32)
    names = ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"]
    arrays = [X, W, R, Bias, seq, h0, c0, P]
    node = helper.make_node("LSTM", names, ["Y", "Y_h", "Y_c"], hidden_size=H)
    graph = helper.make_graph(
        [node], "peepholes",
        [helper.make_tensor_value_info(n, TensorProto.INT32 if n == "sequence_lens" else TensorProto.FLOAT,
                                       list(a.shape)) for n, a in zip(names, arrays)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    feed = dict(zip(names, arrays))
    sess = _ort().InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, feed)
    ours = lf.onnx.load(model)
    # a state carried over: the second run starts from the first's final state, as a streaming
    # caller would, and must still match
    for _ in range(2):
        got = ours.run(None, feed)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not h0.any() and not c0.any()
    feed2 = dict(feed, initial_h=expected[1], initial_c=expected[2])
    expected2 = sess.run(None, feed2)
    for _ in range(2):
        for a, b in zip(ours.run(None, feed2), expected2):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_writing_into_forward_train_output_leaves_the_gradients_alone():
    m = lf.LSTM(3, 4, num_layers=2, proj_size=2, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    out, _, cache = m.forward_train(x)
    g = np.ones_like(out)
    expected = m.backward(cache, g)
    out2, _, cache2 = m.forward_train(x)
    out2[...] = 7.0
    x[...] = 3.0                  # the caller reuses its buffer before backward
    got = m.backward(cache2, g)
    for k, v in expected.params.items():
        np.testing.assert_array_equal(got.params[k], v)
    np.testing.assert_array_equal(got.input, expected.input)
