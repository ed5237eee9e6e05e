"""LSTM.from_keras against Keras itself (torch backend): stateful layers, Bidirectional with
merge_mode=None and initial_state, masks, the refusals, and a Sequential moved layer by layer
(the recipe of docs/keras.md). Issue 14, section 2."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose

import lstm_fast as lf

TOL = dict(rtol=1e-5, atol=3e-6)


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs on another backend in this process")
    return keras


def _np(keras, out):
    if isinstance(out, (list, tuple)):
        return [keras.ops.convert_to_numpy(o) for o in out]
    return [keras.ops.convert_to_numpy(out)]


def _same(keras, got, expected):
    got = got if isinstance(got, list) else [got]
    expected = _np(keras, expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert_allclose(a, b, **TOL)


def _x(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------ stateful
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("return_sequences, return_state, go_backwards",
                         [(False, False, False), (True, True, False), (False, True, True)])
def test_stateful_layers_carry_the_state_between_calls(keras, bidirectional, return_sequences,
                                                       return_state, go_backwards):
    if bidirectional and go_backwards:
        pytest.skip("a Bidirectional wrapper sets go_backwards itself")
    if bidirectional and return_state:
        pytest.skip("Keras 3.15 itself fails there (Bidirectional.compute_mask multiplies a generator)")
    keras.utils.set_random_seed(0)
    inner = keras.layers.LSTM(5, stateful=True, return_sequences=return_sequences,
                              return_state=return_state, go_backwards=go_backwards)
    layer = keras.layers.Bidirectional(inner) if bidirectional else inner
    layer.build((3, 4, 2))
    ours = lf.LSTM.from_keras(layer)
    assert ours.stateful
    xs = [_x(3, 4, 2, seed=s) for s in range(3)]
    for x in xs:                                   # each call continues from the last one
        _same(keras, ours(x), layer(x))
    midway = lf.LSTM.from_keras(layer)             # converted now: starts from Keras' state
    x = _x(3, 4, 2, seed=9)
    _same(keras, midway(x), layer(x))
    layer.reset_states()
    ours.reset_states()
    _same(keras, ours(xs[0]), layer(xs[0]))
    assert len(ours.states) == (4 if bidirectional else 2)
    with pytest.raises(ValueError, match="batch"):
        ours(_x(2, 4, 2))


def test_stateless_layer_does_not_carry(keras):
    layer = keras.layers.LSTM(4)
    layer.build((None, 3, 2))
    ours = lf.LSTM.from_keras(layer)
    x = _x(2, 3, 2)
    np.testing.assert_array_equal(ours(x), ours(x))
    assert ours.states is None
    ours.reset_states()


# ------------------------------------------------------------------------ Bidirectional
@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("return_state", [False, True])
@pytest.mark.parametrize("merge_mode", [None, "concat", "ave", "mul"])
def test_bidirectional_merge_modes_and_initial_state(keras, return_sequences, return_state, merge_mode):
    keras.utils.set_random_seed(1)
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(4, return_sequences=return_sequences, return_state=return_state),
        merge_mode=merge_mode)
    x = _x(2, 5, 3, seed=1)
    expected = layer(x)
    ours = lf.LSTM.from_keras(layer)
    _same(keras, ours(x), expected)
    if merge_mode is None:
        got = ours(x)
        assert isinstance(got, list) and len(got) == (6 if return_state else 2)
    states = [_x(2, 4, seed=10 + k) for k in range(4)]
    _same(keras, ours(x, initial_state=states), layer(x, initial_state=states))


def test_initial_state_of_the_wrong_length_is_refused(keras):
    layer = keras.layers.Bidirectional(keras.layers.LSTM(4))
    layer.build((None, 5, 3))
    with pytest.raises(ValueError, match=r"list of 4 arrays \(\[h_f, c_f, h_b, c_b\]\)"):
        lf.LSTM.from_keras(layer)(_x(2, 5, 3), initial_state=[_x(2, 4), _x(2, 4)])


# ------------------------------------------------------------------------ masks
LENGTHS = np.array([6, 3, 1, 0, 5])


def _mask(lengths=LENGTHS, T=6):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("go_backwards", [False, True])
@pytest.mark.parametrize("zero_output_for_mask", [False, True])
@pytest.mark.parametrize("unroll", [False, True])   # Keras' two loops (torch backend)
def test_masks_become_lengths(keras, return_sequences, go_backwards, zero_output_for_mask, unroll):
    if unroll and go_backwards:
        pytest.skip("Keras 3.15 itself fails there (torch backend: torch.flip of a tuple of masks)")
    keras.utils.set_random_seed(2)
    layer = keras.layers.LSTM(4, return_sequences=return_sequences, return_state=True,
                              go_backwards=go_backwards, zero_output_for_mask=zero_output_for_mask,
                              unroll=unroll)
    x = _x(5, 6, 3, seed=2)
    mask = _mask()
    expected = layer(x, mask=mask)
    ours = lf.LSTM.from_keras(layer)
    _same(keras, ours(x, mask=mask), expected)
    h0 = [_x(5, 4, seed=3), _x(5, 4, seed=4)]
    _same(keras, ours(x, initial_state=h0, mask=mask), layer(x, initial_state=h0, mask=mask))


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("merge_mode", [None, "concat", "sum"])
def test_bidirectional_masks(keras, return_sequences, merge_mode):
    keras.utils.set_random_seed(3)
    layer = keras.layers.Bidirectional(
        keras.layers.LSTM(4, return_sequences=return_sequences, return_state=True), merge_mode=merge_mode)
    x = _x(5, 6, 3, seed=5)
    mask = _mask()
    expected = layer(x, mask=mask)
    _same(keras, lf.LSTM.from_keras(layer)(x, mask=mask), expected)
    states = [_x(5, 4, seed=20 + k) for k in range(4)]
    _same(keras, lf.LSTM.from_keras(layer)(x, initial_state=states, mask=mask),
          layer(x, initial_state=states, mask=mask))


def test_stateful_with_mask(keras):
    keras.utils.set_random_seed(4)
    layer = keras.layers.LSTM(4, stateful=True, return_sequences=True)
    layer.build((5, 6, 3))
    ours = lf.LSTM.from_keras(layer)
    for s in range(2):
        x = _x(5, 6, 3, seed=30 + s)
        _same(keras, ours(x, mask=_mask()), layer(x, mask=_mask()))


@pytest.mark.parametrize("row", [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]])
def test_masks_with_gaps_are_refused(keras, row):
    layer = keras.layers.LSTM(4)
    layer.build((None, 4, 3))
    mask = np.array([[1, 1, 1, 1], row], bool)
    with pytest.raises(ValueError, match="mask row 1 is not right-padded"):
        lf.LSTM.from_keras(layer)(_x(2, 4, 3), mask=mask)
    with pytest.raises(ValueError, match="mask has shape"):
        lf.LSTM.from_keras(layer)(_x(2, 4, 3), mask=mask[:, :3])


def test_mask_as_torch_tensor_and_01_integers(keras):
    import torch

    layer = keras.layers.LSTM(4, return_sequences=True)
    x = _x(5, 6, 3, seed=6)
    expected = layer(x, mask=_mask())
    ours = lf.LSTM.from_keras(layer)
    _same(keras, ours(x, mask=torch.from_numpy(_mask())), expected)
    _same(keras, ours(x, mask=_mask().astype(np.int64)), expected)
    with pytest.raises(TypeError, match="booleans"):
        ours(x, mask=_mask() * 2.5)


# ------------------------------------------------------------------------ what is refused
def test_other_layers_are_refused_with_what_was_passed(keras):
    cases = [
        (keras.layers.SimpleRNN(3), "SimpleRNN.*LSTM cells only"),
        (keras.layers.GRU(3), "GRU.*LSTM cells only"),
        (keras.layers.Dense(3), "Dense.*lf.Linear"),
        (keras.Sequential([keras.Input((4, 2)), keras.layers.LSTM(3)]), "Sequential.*one by one"),
        (keras.layers.Bidirectional(keras.layers.GRU(3)), "Bidirectional wrapper around GRU"),
    ]
    for layer, match in cases:
        with pytest.raises(TypeError, match="from_keras takes a built keras.layers.LSTM"):
            lf.LSTM.from_keras(layer)
        with pytest.raises(TypeError, match=match):
            lf.LSTM.from_keras(layer)
    with pytest.raises(ValueError, match="is not built"):
        lf.LSTM.from_keras(keras.layers.LSTM(3))
    with pytest.raises(ValueError, match="is not built"):
        lf.LSTM.from_keras(keras.layers.Bidirectional(keras.layers.LSTM(3)))


# ------------------------------------------------------------------------ docs/keras.md recipe
def _docs_recipe():
    """The python block of docs/keras.md that defines sequential_to_lstm_fast, run as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "keras.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    code = next(b for b in blocks if "def sequential_to_lstm_fast" in b)
    scope = {}
    exec(compile(code, "docs/keras.md", "exec"), scope)
    return scope["sequential_to_lstm_fast"]


def test_docs_first_example(keras):
    text = (Path(__file__).resolve().parents[1] / "docs" / "keras.md").read_text()
    scope = {}
    exec(compile(re.findall(r"```python\n(.*?)```", text, re.S)[0], "docs/keras.md", "exec"), scope)
    for a, b in zip((scope["seq2"], scope["h2"], scope["c2"]), (scope["seq"], scope["h"], scope["c"])):
        assert_allclose(a, keras.ops.convert_to_numpy(b), **TOL)


def test_sequential_of_lstms_and_a_dense_head(keras):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((7, 3)),
        keras.layers.LSTM(8, return_sequences=True),
        keras.layers.Bidirectional(keras.layers.LSTM(6, return_sequences=True)),
        keras.layers.LSTM(5),
        keras.layers.Dense(2),
    ])
    x = _x(4, 7, 3, seed=7)
    expected = model.predict(x, verbose=0)
    got = _docs_recipe()(model)(x)
    assert got.shape == expected.shape
    assert_allclose(got, expected, **TOL)
