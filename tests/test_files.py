"""Hostile and corrupt model files and checkpoints (issues 14 section 3 and 19): header-first
reading, strict configurations, a parameter cap, digests, atomic checkpoints, optimizer and fit
validation, and training caches that own their data and know the parameter version."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import lstm_fast as lf
from lstm_fast import _io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_of(**kw):
    cfg = dict(input_size=3, hidden_size=4, num_layers=1, bias=True, batch_first=False, dropout=0.0,
               bidirectional=False, proj_size=0, dtype="float32", format=_io.FORMAT)
    cfg.update(kw)
    return cfg


def write_npz(path, config, arrays, digest=None):
    extra = {} if digest is None else {"__digest__": np.array(digest)}
    text = config if isinstance(config, str) else json.dumps(config)
    np.savez(path, __config__=np.array(text), **extra, **arrays)
    return path


def small(dtype=np.float32, **kw):
    return lf.LSTM(3, 4, seed=0, dtype=dtype, **kw)


def same_model(a, b):
    assert repr(a) == repr(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_array_equal(sa[k], sb[k])


# ---------------------------------------------------------------------------- memory before checks
_CHILD = textwrap.dedent("""
    import json, resource, sys, zipfile
    import numpy as np
    sys.path.insert(0, {root!r})
    import lstm_fast as lf
    from lstm_fast import _io
    kind, path = sys.argv[1], sys.argv[2]
    kw = dict(max_params=int(sys.argv[3])) if len(sys.argv) > 3 else {{}}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        lf.load(path, **kw)
        outcome = "loaded"
    except ValueError as exc:
        outcome = "ValueError: " + str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"grew_kb": after - before, "peak_kb": after, "outcome": outcome}}))
""")


def run_child(tmp_path, path, max_params=None):
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(root=ROOT))
    extra = [] if max_params is None else [str(max_params)]
    out = subprocess.run([sys.executable, str(script), "load", str(path)] + extra, capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _huge_config(tmp_path, suffix, with_names):
    cfg = config_of(input_size=4096, hidden_size=4096, num_layers=4)
    # tiny tensors under the right names: the shapes in the headers disagree with the config
    arrays = {k: np.zeros(1, np.float32) for k in _io.expected_shapes(cfg)} if with_names else {}
    path = tmp_path / f"huge_{with_names}{suffix}"
    if suffix == ".npz":
        write_npz(path, cfg, arrays)
    else:
        from safetensors.numpy import save_file
        save_file(arrays or {"x": np.zeros(1, np.float32)}, str(path),
                  metadata={"lstm_fast": json.dumps(cfg)})
    assert path.stat().st_size < 8192   # about 1 KB without the names, 5 KB with them
    return path


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("with_names", [False, True])
@pytest.mark.parametrize("max_params", [None, 2**30], ids=["default_cap", "raised_cap"])
def test_small_file_claiming_a_huge_model_costs_no_memory(tmp_path, suffix, with_names, max_params):
    """Issue 19: a 1 KB file claiming 4096x4096x4 made lf.load build the model (2.6 GB). Refused
    by the parameter cap, and with the cap raised above its 537M parameters by the tensor
    count or the headers' shapes, before anything is built."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = _huge_config(tmp_path, suffix, with_names)
    got = run_child(tmp_path, path, max_params)
    if max_params:
        assert "max_params" not in got["outcome"], got
    print(f"\n{path.name} ({path.stat().st_size} bytes): peak RSS grew {got['grew_kb']} KB (peak "
          f"{got['peak_kb'] // 1024} MB with Python, numpy and lstm_fast); "
          f"{got['outcome'].replace(str(path), path.name)[:160]}")
    assert got["outcome"].startswith("ValueError: "), got
    assert "huge" in got["outcome"]          # the message names the file
    assert got["grew_kb"] < 50 * 1024, got   # peak RSS growth under 50 MB


def test_a_huge_compressed_junk_member_is_never_read(tmp_path):
    """Issue 19: an extra member of 2**29 zeros (2 MB compressed) was read whole (2.1 GB)."""
    m = small()
    path = tmp_path / "junk.npz"
    m.save(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("junk.npy", "w", force_zip64=True) as fp:
            np.lib.format.write_array_header_1_0(
                fp, {"descr": "|u1", "fortran_order": False, "shape": (2**29,)})
            chunk = bytes(1 << 22)
            for _ in range(2**29 // len(chunk)):
                fp.write(chunk)
    assert path.stat().st_size < 4 * 2**20
    got = run_child(tmp_path, path)
    assert got["outcome"].startswith("ValueError: "), got
    assert "junk" in got["outcome"] or "tensors" in got["outcome"]
    assert got["grew_kb"] < 50 * 1024, got


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_million_layers_is_refused_before_building(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    cfg = config_of(input_size=1, hidden_size=1, num_layers=10**6)
    path = tmp_path / f"deep{suffix}"
    if suffix == ".npz":
        write_npz(path, cfg, {"weight_ih_l0": np.zeros((4, 1), np.float32)})
    else:
        from safetensors.numpy import save_file
        save_file({"weight_ih_l0": np.zeros((4, 1), np.float32)}, str(path),
                  metadata={"lstm_fast": json.dumps(cfg)})
    with pytest.raises(ValueError, match="holds 1 tensors, the configuration needs 4000000"):
        lf.load(path)


def test_parameter_cap_can_be_raised(tmp_path):
    m = lf.LSTM(3, 8, num_layers=2, seed=0)
    path = tmp_path / "m.npz"
    m.save(path)
    with pytest.raises(ValueError, match=r"declares 992 parameters, more than max_params=100"):
        lf.load(path, max_params=100)
    same_model(lf.load(path, max_params=992), m)
    # a count, not a dimension: caps above 2**29 (a 4096x4096x4 model has 537M parameters)
    same_model(lf.load(path, max_params=2**40), m)
    with pytest.raises(TypeError, match="max_params"):
        lf.load(path, max_params=1.5)
    with pytest.raises(TypeError, match="max_params"):
        lf.load(path, max_params=True)
    with pytest.raises(ValueError, match="max_params must be >= 1"):
        lf.load(path, max_params=0)


# ---------------------------------------------------------------------------- strict configurations
LOOSE = [
    (dict(batch_first="no"), "'batch_first' must be true or false"),
    (dict(bias="false"), "'bias' must be true or false"),
    (dict(bidirectional=1), "'bidirectional' must be true or false"),
    (dict(input_size="3"), "'input_size' must be an integer"),
    (dict(input_size=3.0), "'input_size' must be an integer"),
    (dict(hidden_size=True), "'hidden_size' must be an integer"),
    (dict(num_layers=0), "'num_layers'=0 is outside"),
    (dict(proj_size=-1), "'proj_size'=-1 is outside"),
    (dict(proj_size=4), "proj_size=4 must be smaller"),
    (dict(dropout="0.5"), "'dropout' must be a number"),
    (dict(dropout=float("nan")), "'dropout' must be a number"),
    (dict(dropout=[0.1]), "'dropout' must be a number"),
    (dict(dtype="float16"), "dtype must be 'float32' or 'float64'"),
    (dict(dtype=["float32"]), "dtype must be 'float32' or 'float64'"),
    (dict(input_size={"a": [[[1]]]}), "'input_size' must be an integer"),
    (dict(extra=1), r"unknown keys \['extra'\]"),
    (dict(format="other/1"), "not an lstm_fast model file"),
]


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("change,message", LOOSE, ids=[str(c) for c, _ in LOOSE])
def test_loose_configurations_are_refused(tmp_path, suffix, change, message):
    """Issue 19: "batch_first": "no" loaded as True, "bias": "false" as True, "3" raised TypeError."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    state = small().state_dict()
    cfg = config_of(**change)
    path = tmp_path / f"loose{suffix}"
    if suffix == ".npz":
        write_npz(path, cfg, state)
    else:
        from safetensors.numpy import save_file
        save_file(state, str(path), metadata={"lstm_fast": json.dumps(cfg)})
    with pytest.raises(ValueError, match=message) as info:
        lf.load(path)
    assert "loose" in str(info.value)


def test_missing_config_keys_nesting_and_bad_json(tmp_path):
    state = small().state_dict()
    cfg = config_of()
    del cfg["bias"]
    with pytest.raises(ValueError, match=r"lacks \['bias'\]"):
        lf.load(write_npz(tmp_path / "a.npz", cfg, state))
    with pytest.raises(ValueError, match="not valid .*JSON"):
        lf.load(write_npz(tmp_path / "b.npz", "[" * 5000 + "]" * 5000, state))
    with pytest.raises(ValueError, match="not valid .*JSON"):
        lf.load(write_npz(tmp_path / "c.npz", "{not json", state))
    with pytest.raises(ValueError, match="configuration must be a JSON object"):
        lf.load(write_npz(tmp_path / "d.npz", "[1, 2]", state))
    with pytest.raises(ValueError, match="(more|longer) than 65536"):
        lf.load(write_npz(tmp_path / "e.npz", json.dumps(dict(config_of(), pad=" " * 70000)), state))
    # deep nesting inside a value (RecursionError in json before)
    deep = json.dumps(config_of())[:-1] + ', "x": ' + "[" * 20000 + "]" * 20000 + "}"
    with pytest.raises(ValueError, match="too deeply nested"):
        lf.load(write_npz(tmp_path / "f.npz", deep, state))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("kind", ["int", "float16", "float64", "shape", "missing", "extra"])
def test_tensors_are_checked_against_the_configuration(tmp_path, suffix, kind):
    """Non-float weights raised TypeError; now every mismatch is a ValueError naming the tensor."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    state = small().state_dict()
    if kind == "int":
        state["weight_ih_l0"] = state["weight_ih_l0"].astype(np.int32)
    elif kind in ("float16", "float64"):
        state["weight_hh_l0"] = state["weight_hh_l0"].astype(kind)
    elif kind == "shape":
        state["bias_ih_l0"] = state["bias_ih_l0"][:-1]
    elif kind == "missing":
        del state["bias_hh_l0"]
    else:
        state["bias_xx_l0"] = state["bias_hh_l0"]
    path = tmp_path / f"t{suffix}"
    if suffix == ".npz":
        write_npz(path, config_of(), state)
    else:
        from safetensors.numpy import save_file
        save_file(state, str(path), metadata={"lstm_fast": json.dumps(config_of())})
    with pytest.raises(ValueError, match=r"tensor|tensors"):
        lf.load(path)


def test_duplicate_npz_members_are_refused(tmp_path):
    """Issue 19: two members of one name, the last won silently."""
    m = small()
    path = tmp_path / "dup.npz"
    m.save(path)
    other = tmp_path / "other.npy"
    np.save(other, np.zeros((16, 3), np.float32))
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "a") as zf:
            zf.write(other, "weight_ih_l0.npy")
    with pytest.raises(ValueError, match=r"members \['weight_ih_l0.npy'\] appear more than once"):
        lf.load(path)


def test_pickled_and_foreign_members(tmp_path):
    path = tmp_path / "obj.npz"
    state = dict(small().state_dict(), weight_ih_l0=np.array([object()] * 3, dtype=object))
    np.savez(path, __config__=np.array(json.dumps(config_of())), **state)
    with pytest.raises(ValueError, match="Python objects"):
        lf.load(path)
    with zipfile.ZipFile(tmp_path / "txt.npz", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="not .npy"):
        lf.load(tmp_path / "txt.npz")


def test_frozen_models_save_and_load(tmp_path):
    m = lf.LSTM(3, 5, num_layers=2, bidirectional=True, seed=1)
    frozen = m.freeze()
    for suffix in (".npz", ".safetensors"):
        if suffix == ".safetensors" and not _has_safetensors():
            continue
        path = tmp_path / f"frozen{suffix}"
        frozen.save(path)
        same_model(lf.load(path), m)


def _has_safetensors():
    try:
        import safetensors  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------- digests and finiteness
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_changed_weights_fail_the_digest(tmp_path, suffix):
    """Issue 14: 70 of 220 byte flips in a .safetensors file loaded silently (no checksum)."""
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
        from safetensors.numpy import save_file
    m = small()
    path = tmp_path / f"m{suffix}"
    m.save(path)
    stamp = _io.digest(_io.model_config(m), m.state_dict())
    state = m.state_dict()
    state["weight_hh_l0"][1, 2] += 1e-3
    changed = tmp_path / f"changed{suffix}"
    if suffix == ".npz":
        write_npz(changed, _io.model_config(m), state, digest=stamp)
    else:
        save_file(state, str(changed), metadata={"lstm_fast": json.dumps(_io.model_config(m)),
                                                 "lstm_fast.digest": stamp})
    with pytest.raises(ValueError, match="changed.* do not match the digest"):
        lf.load(changed)
    # a file without a digest (written elsewhere) loads: documented in docs/files.md
    plain = tmp_path / f"plain{suffix}"
    if suffix == ".npz":
        write_npz(plain, _io.model_config(m), m.state_dict())
    else:
        save_file(m.state_dict(), str(plain), metadata={"lstm_fast": json.dumps(_io.model_config(m))})
    same_model(lf.load(plain), m)
    same_model(lf.load(path), m)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights_are_refused_unless_asked(tmp_path, suffix, bad):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    m = small()
    m.parameters()["bias_ih_l0"][3] = bad
    path = tmp_path / f"nan{suffix}"
    m.save(path)
    with pytest.raises(ValueError, match=r"'bias_ih_l0' holds 1 NaN/inf values .*allow_nonfinite"):
        lf.load(path)
    back = lf.load(path, allow_nonfinite=True)
    assert_array_equal(back.state_dict()["bias_ih_l0"], m.state_dict()["bias_ih_l0"])


# ---------------------------------------------------------------------------- mutation tests
def _mutants(data, rng, n_flips, n_cuts):
    for _ in range(n_flips):
        pos = int(rng.integers(len(data)))
        flipped = bytearray(data)
        flipped[pos] ^= int(rng.integers(1, 256))
        yield bytes(flipped)
    for _ in range(n_cuts):
        yield data[:int(rng.integers(len(data)))]


def _checkpoint_parts(seed=0):
    m = lf.LSTM(3, 4, num_layers=2, seed=seed)
    head = lf.nn.Linear(4, 2, seed=seed)
    opt = lf.optim.Adam([m.parameters(), head.parameters()], lr=1e-2)
    return m, head, opt


def _trained_checkpoint(path):
    m, head, opt = _checkpoint_parts()
    x = np.random.default_rng(0).standard_normal((8, 5, 3)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((8, 2)).astype(np.float32)
    lf.fit(m, head, x, y, epochs=1, batch_size=4, optimizer=opt, progress=False)
    lf.save_checkpoint(path, m, head, opt)
    return m, head, opt


def _snapshot(m, head, opt):
    return ({k: a.copy() for k, a in m.state_dict().items()}, head.state_dict(), opt.state_dict())


def _assert_same_snapshot(a, b):
    for da, db in zip(a, b):
        assert list(da) == list(db)
        for k in da:
            assert_array_equal(da[k], db[k])


def mutation_counts(fmt, tmp_path, n_flips, n_cuts, seed=0):
    """(refused with ValueError, loaded identical); anything else fails the test."""
    rng = np.random.default_rng(seed)
    path = tmp_path / f"orig.{fmt}"
    if fmt == "checkpoint.npz":
        orig = _snapshot(*_trained_checkpoint(path))
    else:
        m = lf.LSTM(3, 4, num_layers=2, bidirectional=True, seed=0)
        m.save(path)
    refused = same = 0
    for k, blob in enumerate(_mutants(path.read_bytes(), rng, n_flips, n_cuts)):
        bad = tmp_path / f"bad{k}.{fmt}"
        bad.write_bytes(blob)
        if fmt == "checkpoint.npz":
            targets = _checkpoint_parts(seed=5)
            before = _snapshot(*targets)
            try:
                lf.load_checkpoint(bad, *targets)
            except ValueError:
                refused += 1
                _assert_same_snapshot(_snapshot(*targets), before)   # nothing assigned
            else:
                same += 1
                _assert_same_snapshot(_snapshot(*targets), orig)
        else:
            try:
                back = lf.load(bad)
            except ValueError:
                refused += 1
            else:
                same += 1
                same_model(back, m)
        bad.unlink()
    return refused, same


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "checkpoint.npz"])
def test_mutated_files_give_value_error_or_the_same_model(tmp_path, fmt):
    """Issue 14/19: seeded byte flips and truncations of every format give only ValueError (or
    an identical model); checkpoints that fail leave model, head and optimizer unchanged."""
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    refused, same = mutation_counts(fmt, tmp_path, n_flips=60, n_cuts=20)
    assert refused + same == 80
    assert refused >= 60


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["npz", "safetensors", "checkpoint.npz"])
def test_mutated_files_220(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    refused, same = mutation_counts(fmt, tmp_path, n_flips=220, n_cuts=220, seed=1)
    print(f"{fmt}: {refused} refused, {same} identical of 440")
    assert refused + same == 440


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_old_files_without_digest(tmp_path):
    path = tmp_path / "ck.npz"
    src = _trained_checkpoint(path)
    targets = _checkpoint_parts(seed=9)
    config = lf.load_checkpoint(path, *targets)
    assert config["hidden_size"] == 4 and config["num_layers"] == 2
    _assert_same_snapshot(_snapshot(*targets), _snapshot(*src))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k != "__digest__"}
    np.savez(tmp_path / "old.npz", **arrays)
    targets = _checkpoint_parts(seed=9)
    lf.load_checkpoint(tmp_path / "old.npz", *targets)
    _assert_same_snapshot(_snapshot(*targets), _snapshot(*src))


def _rewrite(path, out, drop=(), add=None, change=None):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files if k not in drop}
    arrays.update(add or {})
    for k, fn in (change or {}).items():
        arrays[k] = fn(arrays[k])
    np.savez(out, **arrays)
    return out


CK_FAULTS = [
    (dict(drop=("config",)), "no 'config' member"),
    (dict(add={"optim/bogus": np.zeros(3)}), "names no parameter|do not match"),
    (dict(add={"optim/0/weight_ih_l0/velocity": np.zeros((16, 3))}), "do not match|slots"),
    (dict(add={"stray": np.zeros(3)}), r"members \['stray'\] belong to no part"),
    (dict(change={"head/weight": lambda a: a[:, :-1]}), r"'head/weight' has shape \(2, 3\)"),
    (dict(drop=("model/bias_hh_l1",)), r"lacks \['bias_hh_l1'\]"),
    (dict(change={"config": lambda a: np.array(str(a).replace('"bias": true', '"bias": "yes"'))}),
     "'bias' must be true or false"),
    (dict(change={"config": lambda a: np.array(str(a).replace('"hidden_size": 4', '"hidden_size": 5'))}),
     "hidden_size"),
    (dict(drop=("__digest__",), change={"optim/__lr": lambda a: np.array(np.nan)}), "__lr must be finite"),
    (dict(drop=("__digest__",), change={"optim/__steps": lambda a: np.array(-5)}), "__steps must be >= 0"),
    (dict(drop=("__digest__",), change={"model/weight_hh_l0": lambda a: a * np.nan}),
     "'weight_hh_l0' holds 64 NaN/inf"),
    (dict(change={"model/weight_hh_l0": lambda a: a + 1}), r"\(model\).*do not match the digest"),
    (dict(change={"optim/0/weight_hh_l0/exp_avg": lambda a: a * 2}), r"\(optimizer\).*digest"),
]


@pytest.mark.parametrize("fault,message", CK_FAULTS, ids=[str(m) for _, m in CK_FAULTS])
def test_faulty_checkpoints_are_refused_and_change_nothing(tmp_path, fault, message):
    """Issue 19: load_checkpoint overwrote the model, then failed on the head (KeyError for a
    missing config, 'not enough values to unpack' for a stray optim key)."""
    path = tmp_path / "ck.npz"
    _trained_checkpoint(path)
    bad = _rewrite(path, tmp_path / "bad.npz", **fault)
    targets = _checkpoint_parts(seed=5)
    before = _snapshot(*targets)
    with pytest.raises(ValueError, match=message) as info:
        lf.load_checkpoint(bad, *targets)
    assert "bad.npz" in str(info.value)
    _assert_same_snapshot(_snapshot(*targets), before)


def test_checkpoint_without_the_parts_asked_for(tmp_path):
    m, head, opt = _checkpoint_parts()
    lf.save_checkpoint(tmp_path / "m.npz", m)
    with pytest.raises(ValueError, match="holds no head"):
        lf.load_checkpoint(tmp_path / "m.npz", *_checkpoint_parts(1))
    with pytest.raises(ValueError, match="not a readable"):
        (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04" + bytes(50))
        lf.load_checkpoint(tmp_path / "junk.npz", m)


# ---------------------------------------------------------------------------- optimizers
def _opt_with_state(cls=lf.optim.Adam, **kw):
    m = small()
    opt = cls(m.parameters(), lr=0.1, **kw)
    opt.step({k: np.ones_like(p) for k, p in m.parameters().items()})
    return m, opt


OPT_FAULTS = [
    ({"__lr": np.array(np.nan)}, ValueError, "finite"),
    ({"__lr": np.array(-1.0)}, ValueError, "> 0"),
    ({"__lr": np.array(np.inf)}, ValueError, "finite"),
    ({"__steps": np.array(-5)}, ValueError, ">= 0"),
    ({"__steps": np.array(2.5)}, ValueError, "integer"),
    ({"0/weight_ih_l0/exp_avg": np.zeros((3, 3))}, ValueError, "has shape"),
    ({"0/weight_ih_l0/velocity": np.zeros((16, 3))}, ValueError, "slots"),
    ({"0/weight_xx/exp_avg": np.zeros((16, 3))}, ValueError, "names no parameter"),
    ({"junk": np.zeros(3)}, ValueError, "names no parameter"),
    ({"0/weight_ih_l0/exp_avg": np.full((16, 3), np.nan)}, ValueError, "NaN"),
]


@pytest.mark.parametrize("change,exc,message", OPT_FAULTS, ids=[m for _, _, m in OPT_FAULTS])
def test_optimizer_load_state_dict_validates(change, exc, message):
    """Issue 19: lr=nan, lr=-1, steps=-5, wrong slot shapes and unknown slots were accepted."""
    m, opt = _opt_with_state()
    state = opt.state_dict()
    before = opt.state_dict()
    state.update(change)
    with pytest.raises(exc, match=message):
        opt.load_state_dict(state)
    _assert_same_snapshot((opt.state_dict(),), (before,))
    with pytest.raises(ValueError, match="lacks"):
        opt.load_state_dict({})


def test_optimizer_constructors_validate():
    p = small().parameters()
    for bad in (np.nan, np.inf, -1, 0):
        with pytest.raises(ValueError, match="lr"):
            lf.optim.SGD(p, lr=bad)
    with pytest.raises(TypeError, match="lr"):
        lf.optim.Adam(p, lr="0.1")
    with pytest.raises(ValueError, match="betas"):
        lf.optim.Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum"):
        lf.optim.SGD(p, momentum=-0.5)
    with pytest.raises(ValueError, match="eps"):
        lf.optim.AdamW(p, eps=np.nan)


def test_optimizer_state_round_trips_with_sgd_momentum():
    m, opt = _opt_with_state(lf.optim.SGD, momentum=0.9)
    m2 = small()
    opt2 = lf.optim.SGD(m2.parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.lr == 0.1 and opt2.steps == 1
    _assert_same_snapshot((opt2.state_dict(),), (opt.state_dict(),))


# ---------------------------------------------------------------------------- fit arguments
def _fit_parts():
    m = lf.LSTM(3, 4, seed=0)
    head = lf.nn.Linear(4, 2, seed=0)
    x = np.random.default_rng(0).standard_normal((6, 5, 3))
    y = np.random.default_rng(1).standard_normal((6, 2))
    return m, head, x, y


FIT_FAULTS = [
    (dict(batch_size=-1), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(batch_size=2.0), TypeError, "batch_size must be a positive int"),
    (dict(batch_size=True), TypeError, "batch_size"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(epochs="3"), TypeError, "epochs"),
    (dict(patience=2), ValueError, "patience needs validation"),
    (dict(patience=0, validation="v"), ValueError, "patience must be >= 1"),
    (dict(clip_norm=np.nan), ValueError, "clip_norm"),
    (dict(clip_norm=-1.0), ValueError, "clip_norm"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(progress="yes"), TypeError, "progress"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(loss="l1"), ValueError, "loss"),
    (dict(loss=["mse"]), ValueError, "loss"),
    (dict(validation=(1, 2, 3)), TypeError, "validation"),
    (dict(validation="badshape"), ValueError, "x_val has shape"),
    (dict(validation="badrows"), ValueError, r"y_val has shape \(2, 2\), expected \(3, 2\)"),
    (dict(x="rows"), ValueError, r"y has shape \(6, 2\), expected \(5, 2\)"),
    (dict(x="nan"), ValueError, "x holds NaN"),
    (dict(x="features"), ValueError, r"x has shape \(6, 5, 2\)"),
    (dict(x="empty"), ValueError, r"x has shape \(0, 5, 3\)"),
    (dict(y="column"), ValueError, r"y has shape \(6,\), expected \(6, 2\)"),
    (dict(loss="cross_entropy"), TypeError, "integer labels"),
    (dict(loss="cross_entropy", y="labels9"), ValueError, r"labels must lie in 0..1"),
    (dict(head="wide"), ValueError, "head has in_features=5, expected 4"),
    (dict(head="module"), TypeError, "head must be an lf.nn.Linear"),
]


@pytest.mark.parametrize("kw,exc,message", FIT_FAULTS, ids=[m for _, _, m in FIT_FAULTS])
def test_fit_validates_every_argument(kw, exc, message):
    """Issue 19: batch_size=-1 trained nothing and reported [0.0, 0.0]; 0 raised ZeroDivisionError."""
    m, head, x, y = _fit_parts()
    kw = dict(kw)
    if kw.get("validation") == "v":
        kw["validation"] = (x, y)
    elif kw.get("validation") == "badshape":
        kw["validation"] = (x[..., :2], y)
    elif kw.get("validation") == "badrows":
        kw["validation"] = (x[:3], y[:2])
    x = {"rows": x[:5], "nan": np.where(x > 1, np.nan, x), "features": x[..., :2],
         "empty": x[:0]}.get(kw.pop("x", None), x)
    y = {"column": y[:, 0], "labels9": np.full(6, 9)}.get(kw.pop("y", None), y)
    head = {"wide": lf.nn.Linear(5, 2), "module": m}.get(kw.pop("head", None), head)
    before = m.state_dict()
    with pytest.raises(exc, match=message):
        lf.fit(m, head, x, y, progress=False, **kw)
    _assert_same_snapshot((m.state_dict(),), (before,))


def test_fit_still_trains():
    m, head, x, y = _fit_parts()
    hist = lf.fit(m, head, x, y, epochs=2, batch_size=4, progress=False, validation=(x, y), patience=3)
    assert len(hist.train_loss) == 2 and all(np.isfinite(hist.train_loss)) and hist.train_loss[0] > 0


# ---------------------------------------------------------------------------- training caches
@pytest.mark.parametrize("layout", ["time_major", "batch_first", "unbatched"])
def test_cache_owns_the_input(layout):
    """Issue 19: changing x after forward_train changed the next backward's dW_ih (by 0.83)."""
    bf = layout == "batch_first"
    m = lf.LSTM(3, 4, num_layers=2, seed=0, dtype=np.float64, batch_first=bf)
    shape = (5, 3) if layout == "unbatched" else (2, 5, 3)
    x = np.random.default_rng(0).standard_normal(shape)
    out, _, cache = m.forward_train(x)
    want = m.backward(m.forward_train(x.copy())[2], np.ones_like(out))
    x[...] = 7.0                      # the caller reuses its buffer
    got = m.backward(cache, np.ones_like(out))
    for k in want.params:
        assert_array_equal(got.params[k], want.params[k])
    assert_array_equal(got.input, want.input)


def test_cache_owns_the_lengths():
    m = lf.LSTM(3, 4, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 3, 3))
    lengths = np.array([5, 3, 2], dtype=np.intp)
    out, _, cache = m.forward_train(x, lengths=lengths)
    want = m.backward(m.forward_train(x, lengths=lengths.copy())[2], np.ones_like(out))
    lengths[:] = 5
    got = m.backward(cache, np.ones_like(out))
    for k in want.params:
        assert_array_equal(got.params[k], want.params[k])


def _stale(m, cache, out):
    with pytest.raises(ValueError, match="modified in place .* run forward_train again"):
        m.backward(cache, np.ones_like(out))


@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "reset_parameters",
                                    "load_checkpoint", "mark_modified", "setstate"])
def test_backward_refuses_a_stale_cache(tmp_path, change):
    """Issue 19: backward with a cache from before an optimizer step mixed new weights with old
    activations (dW_ih off by 1.76); torch raises."""
    m = lf.LSTM(3, 4, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    out, _, cache = m.forward_train(x)
    if change == "optimizer":
        opt = lf.optim.SGD(m.parameters(), lr=0.1)
        opt.step(m.backward(cache, np.ones_like(out)).params)   # the cache was fine until the step
    elif change == "load_state_dict":
        m.load_state_dict(lf.LSTM(3, 4, seed=1, dtype=np.float64).state_dict())
    elif change == "reset_parameters":
        m.reset_parameters(3)
    elif change == "load_checkpoint":
        lf.save_checkpoint(tmp_path / "c.npz", lf.LSTM(3, 4, seed=2))
        lf.load_checkpoint(tmp_path / "c.npz", m)
    elif change == "mark_modified":
        params = m.parameters()
        params["weight_ih_l0"][0, 0] += 1.0
        params.mark_modified()
    else:
        m.__setstate__(lf.LSTM(3, 4, seed=4, dtype=np.float64).__getstate__())
    _stale(m, cache, out)
    out, _, cache = m.forward_train(x)     # a new forward with the current weights is fine
    m.backward(cache, np.ones_like(out))


def test_optimizer_over_lists_of_groups_bumps_every_model():
    m = lf.LSTM(3, 4, seed=0)
    head = lf.nn.Linear(4, 2)
    opt = lf.optim.Adam([m.parameters(), head.parameters()], lr=1e-2)
    x = np.ones((5, 2, 3), np.float32)
    out, _, cache = m.forward_train(x)
    g = m.backward(cache, np.ones_like(out))
    opt.step([g.params, {k: np.zeros_like(p) for k, p in head.parameters().items()}])
    _stale(m, cache, out)


def test_parameters_dict_pickles_as_a_dict():
    import pickle

    params = lf.LSTM(3, 4, seed=0).parameters()
    back = pickle.loads(pickle.dumps(params))
    assert type(back) is dict and list(back) == list(params)
