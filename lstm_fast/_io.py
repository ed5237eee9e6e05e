"""Model files (.npz, .safetensors) that never unpickle, converters from torch and Keras, and the
pickling of models as weights + configuration (for Dask and multiprocessing)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from typing import Any

import numpy as np

from . import _validate as v

CONFIG_KEYS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
               "bidirectional", "proj_size")
FORMAT = "lstm_fast.LSTM/1"
# the default cap on the parameters a model file may declare (2**28: 1 GiB of float32 weights);
# lf.load(path, max_params=...) raises it
DEFAULT_MAX_PARAMS = 2**28
_MAX_CONFIG_CHARS = 1 << 16         # the JSON configuration, in characters
_MAX_SAFETENSORS_HEADER = 1 << 24   # bytes of a safetensors JSON header
_DIGEST_PREFIX = "sha256:"
_NPY_DTYPES = {"float32": "<f4", "float64": "<f8"}
_ST_DTYPES = {"float32": "F32", "float64": "F64"}
# every dtype string the safetensors format defines (others are a malformed header)
_ST_KNOWN = {"BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64",
             "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}


def model_config(model):
    config = {k: getattr(model, k) for k in CONFIG_KEYS}
    config["dtype"] = model.dtype.name
    config["format"] = FORMAT
    precision = getattr(model, "precision", "float32")
    if precision != "float32":   # a reduced-precision FrozenLSTM (float32 files stay as they were)
        config["precision"] = precision
    return config


def _int(config, key, where, minimum):
    value = config[key]
    if type(value) is not int:     # JSON gives int, float, str, bool, list, dict or None
        raise ValueError(f"{where}: the configuration's {key!r} must be an integer, got {value!r}")
    if not minimum <= value <= v.MAX_DIM // 4:
        raise ValueError(f"{where}: the configuration's {key!r}={value} is outside "
                         f"{minimum}..{v.MAX_DIM // 4}")
    return value


def check_config(config, where, need_format=True):
    """The configuration of a model file, with strict types: ints are ints (not "3", 3.0 or
    True), bools are bools (not "no"), dtype is "float32" or "float64", nothing else is in it.
    Raises ValueError naming `where`."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the configuration must be a JSON object, got {type(config).__name__}")
    keys = set(CONFIG_KEYS) | {"dtype"} | ({"format"} if need_format else set())
    if "precision" in config:   # optional: a FrozenLSTM of reduced precision
        keys.add("precision")
        if config["precision"] not in ("bfloat16", "int8"):
            raise ValueError(f"{where}: the configuration's precision must be 'bfloat16' or "
                             f"'int8', got {config['precision']!r}")
        if config.get("dtype") != "float32":
            raise ValueError(f"{where}: a {config['precision']} model has float32 weights, "
                             f"the configuration says dtype={config.get('dtype')!r}")
    if need_format and config.get("format") != FORMAT:
        raise ValueError(f"{where} is not an lstm_fast model file (no '{FORMAT}' configuration)")
    missing = sorted(keys - set(config))
    extra = sorted(map(str, set(config) - keys))
    if missing or extra:
        raise ValueError(f"{where}: the configuration " + "; ".join(
            ([f"lacks {missing}"] if missing else []) + ([f"has unknown keys {extra[:8]}"] if extra else [])))
    for key in ("input_size", "hidden_size", "num_layers"):
        _int(config, key, where, 1)
    _int(config, "proj_size", where, 0)
    if config["proj_size"] >= config["hidden_size"]:
        raise ValueError(f"{where}: the configuration's proj_size={config['proj_size']} must be "
                         f"smaller than hidden_size={config['hidden_size']}")
    for key in ("bias", "batch_first", "bidirectional"):
        if type(config[key]) is not bool:
            raise ValueError(f"{where}: the configuration's {key!r} must be true or false, "
                             f"got {config[key]!r}")
    dropout = config["dropout"]
    if type(dropout) not in (int, float) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{where}: the configuration's 'dropout' must be a number in [0, 1], got {dropout!r}")
    if not isinstance(config["dtype"], str) or config["dtype"] not in _NPY_DTYPES:
        raise ValueError(f"{where}: the configuration's dtype must be 'float32' or 'float64', "
                         f"got {config['dtype']!r}")
    return config


def count_parameters(config):
    """The parameters a (checked) configuration declares, in O(1)."""
    H, P, L = config["hidden_size"], config["proj_size"], config["num_layers"]
    D = 2 if config["bidirectional"] else 1
    H_out = P or H
    per_dir = 4 * H * H_out + (8 * H if config["bias"] else 0) + (P * H if P else 0)
    return D * (4 * H * config["input_size"] + (L - 1) * 4 * H * D * H_out + L * per_dir)


def count_tensors(config):
    D = 2 if config["bidirectional"] else 1
    return config["num_layers"] * D * (2 + 2 * config["bias"] + (config["proj_size"] > 0))


def expected_shapes(config):
    """name -> shape of every tensor of the configuration, in state_dict order."""
    H, P, L = config["hidden_size"], config["proj_size"], config["num_layers"]
    D = 2 if config["bidirectional"] else 1
    H_out = P or H
    shapes = {}
    for k in range(L):
        in_k = config["input_size"] if k == 0 else D * H_out
        for d in range(D):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            shapes["weight_ih" + sfx] = (4 * H, in_k)
            shapes["weight_hh" + sfx] = (4 * H, H_out)
            if config["bias"]:
                shapes["bias_ih" + sfx] = (4 * H,)
                shapes["bias_hh" + sfx] = (4 * H,)
            if P:
                shapes["weight_hr" + sfx] = (P, H)
    return shapes


def _check_budget(config, where, max_params, n_tensors_in_file):
    n = count_parameters(config)
    if n > max_params:
        raise ValueError(f"{where}: the configuration declares {n} parameters, more than "
                         f"max_params={max_params} (pass a larger max_params= to load it)")
    want = count_tensors(config)
    if n_tensors_in_file != want:
        raise ValueError(f"{where}: the file holds {n_tensors_in_file} tensors, the configuration "
                         f"needs {want}")


def digest(config, arrays):
    """"sha256:<hex>" over the configuration (canonical JSON) and the tensors in name order
    (name, dtype, shape and little-endian bytes of each)."""
    h = hashlib.sha256(b"lstm_fast digest 1\n")
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(memoryview(a).cast("B"))
    return _DIGEST_PREFIX + h.hexdigest()


def _verify_digest(stored, config, arrays, where):
    if stored is None:
        return   # a file from elsewhere: loads, with the other checks (see docs/files.md)
    if not isinstance(stored, str) or not stored.startswith(_DIGEST_PREFIX):
        raise ValueError(f"{where}: the stored digest {str(stored)[:80]!r} is not 'sha256:<hex>'")
    actual = digest(config, arrays)
    if actual != stored:
        raise ValueError(f"{where}: the contents do not match the digest stored when it was saved "
                         f"(stored {stored[:23]}..., contents {actual[:23]}...): the file is corrupt "
                         f"or was changed")


def _check_finite(arrays, where, allow_nonfinite):
    if allow_nonfinite:
        return
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise ValueError(f"{where}: tensor {name!r} holds {bad} NaN/inf values (pass "
                             f"allow_nonfinite=True to load it anyway)")


def _json(text, where, what="the configuration"):
    if len(text) > _MAX_CONFIG_CHARS:
        raise ValueError(f"{where}: {what} is {len(text)} characters, more than {_MAX_CONFIG_CHARS}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{where}: {what} is not valid (or too deeply nested) JSON") from None


def _suffix(path):
    suffix = os.path.splitext(str(path))[1].lower()
    if suffix not in (".npz", ".safetensors"):
        raise ValueError(f"model files end in .npz or .safetensors, got {str(path)!r}")
    return suffix


def save(model, path):
    """Weights, configuration and their digest in one file; the format follows the suffix."""
    state = model.state_dict()
    config = model_config(model)
    stamp = digest(config, state)
    text = json.dumps(config)
    if _suffix(path) == ".npz":
        np.savez(path, __config__=np.array(text), __digest__=np.array(stamp), **state)
    else:
        try:
            from safetensors.numpy import save_file
        except ImportError:
            raise ImportError("safetensors files need the safetensors package: pip install safetensors") from None
        save_file({k: np.ascontiguousarray(a) for k, a in state.items()}, str(path),
                  metadata={"lstm_fast": text, "lstm_fast.digest": stamp})


# ---------------------------------------------------------------------------- npz reading
_PASS = (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError, KeyboardInterrupt)


class NpzReader:
    """An .npz (zip of .npy) read header first: the zip directory and each member's npy header
    are checked before any data is read, and only the members asked for are read.

    Duplicate member names, non-.npy members, object dtypes (nothing is unpickled) and members
    whose data size disagrees with their header are refused with ValueError naming the file.
    """

    def __init__(self, path):
        self.path = path
        self.where = repr(str(path))
        try:
            self.zf = zipfile.ZipFile(path)
        except _PASS:
            raise
        except Exception as exc:
            raise ValueError(f"{self.where} is not a readable .npz model file: {exc}") from None
        names = [info.filename for info in self.zf.infolist()]
        seen, dups = set(), set()
        for name in names:
            (dups if name in seen else seen).add(name)
        if dups:
            self.close()
            raise ValueError(f"{self.where}: members {sorted(dups)[:8]} appear more than once "
                             f"(a file written by lstm_fast never has two members of one name)")
        bad = [n for n in names if not n.endswith(".npy")]
        if bad:
            self.close()
            raise ValueError(f"{self.where} is not an .npz of arrays: members {bad[:8]} are not .npy")
        self.infos = {info.filename[:-4]: info for info in self.zf.infolist()}

    def close(self):
        self.zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def names(self):
        return list(self.infos)

    def _guard(self, fn, name):
        try:
            return fn()
        except _PASS:
            raise
        except ValueError as exc:
            if str(exc).startswith(self.where):
                raise
            raise ValueError(f"{self.where} is not a readable .npz model file: member {name!r}: {exc}") from None
        except Exception as exc:   # BadZipFile (CRC), EOFError, zlib.error, struct.error, ...
            raise ValueError(f"{self.where} is not a readable .npz model file: member {name!r}: "
                             f"{type(exc).__name__}: {exc}") from None

    def _header(self, fp, name):
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=10000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=10000)
        else:
            raise ValueError(f"npy format version {version} is not supported")
        if dtype.hasobject:
            raise ValueError(f"{self.where} is not a readable .npz model file: member {name!r} "
                             f"holds Python objects (never unpickled)")
        return tuple(shape), fortran, dtype

    def header(self, name):
        """(shape, fortran_order, dtype) of a member, reading only its npy header."""
        def run():
            with self.zf.open(self.infos[name]) as fp:
                return self._header(fp, name)
        return self._guard(run, name)

    def read(self, name, check=None):
        """The array of member `name`; `check(shape, dtype)` may refuse it (raise) from the header
        alone, before its data is read."""
        def run():
            info = self.infos[name]
            with self.zf.open(info) as fp:
                shape, fortran, dtype = self._header(fp, name)
                if check is not None:
                    check(shape, dtype)
                count = math.prod(shape)
                nbytes = count * dtype.itemsize
                if info.file_size > nbytes + 65536 + 16:
                    raise ValueError(f"{self.where}: member {name!r} is {info.file_size} bytes, its "
                                     f"header declares {nbytes} bytes of data")
                data = fp.read(nbytes)
                if len(data) != nbytes:
                    raise ValueError(f"{self.where}: member {name!r} is truncated ({len(data)} of "
                                     f"{nbytes} bytes)")
                if fp.read(1):
                    raise ValueError(f"{self.where}: member {name!r} has data past its array")
            arr = np.frombuffer(data, dtype=dtype, count=count)
            return arr.reshape(shape, order="F" if fortran else "C")
        return self._guard(run, name)

    def read_text(self, name):
        """A 0-d unicode member (a configuration or a digest), at most _MAX_CONFIG_CHARS long."""
        def check(shape, dtype):
            if shape != () or dtype.kind != "U":
                raise ValueError(f"{self.where}: member {name!r} must be a text scalar, got "
                                 f"{dtype} of shape {shape}")
            if dtype.itemsize > 4 * _MAX_CONFIG_CHARS:
                raise ValueError(f"{self.where}: member {name!r} is longer than {_MAX_CONFIG_CHARS} characters")
        return str(self.read(name, check)[()])

    def read_tensors(self, specs, prefix=""):
        """{name: array} of the members prefix+name, each checked against specs[name] =
        (shape, allowed dtypes) before its data is read."""
        out = {}
        for name, (shape, dtypes) in specs.items():
            def check(got_shape, got_dtype, name=name, shape=shape, dtypes=dtypes):
                if got_dtype.str not in dtypes:
                    raise ValueError(f"{self.where}: tensor {prefix + name!r} is {got_dtype}, "
                                     f"expected {' or '.join(np.dtype(d).name for d in dtypes)}")
                if got_shape != tuple(shape):
                    raise ValueError(f"{self.where}: tensor {prefix + name!r} has shape {got_shape}, "
                                     f"expected {tuple(shape)}")
            out[name] = self.read(prefix + name, check)
        return out


def _names_diff(where, have, want, what="tensors"):
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        parts = ([f"lacks {missing[:8]}" + (" ..." if len(missing) > 8 else "")] if missing else []) + \
                ([f"has unexpected {extra[:8]}" + (" ..." if len(extra) > 8 else "")] if extra else [])
        raise ValueError(f"{where}: the {what} do not match the configuration: " + "; ".join(parts))


def _load_npz(path, max_params):
    with NpzReader(path) as f:
        where = f.where
        if "__config__" not in f.infos:
            raise ValueError(f"{where} is not an lstm_fast model file (no configuration)")
        config = check_config(_json(f.read_text("__config__"), where), where)
        has_digest = "__digest__" in f.infos
        tensors = [n for n in f.names if n not in ("__config__", "__digest__")]
        _check_budget(config, where, max_params, len(tensors))
        shapes = expected_shapes(config)
        _names_diff(where, tensors, shapes)
        dt = _NPY_DTYPES[config["dtype"]]
        arrays = f.read_tensors({k: (s, (dt,)) for k, s in shapes.items()})
        stored = f.read_text("__digest__") if has_digest else None
    return config, arrays, stored, where


# ---------------------------------------------------------------------------- safetensors reading
def _load_safetensors(path, max_params):
    where = repr(str(path))

    def bad(what):
        return ValueError(f"{where} is not a readable .safetensors model file: {what}")

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) != 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise bad(f"the header claims {n} bytes; the file has {size - 8} after the length"
                      + (f" and headers are capped at {_MAX_SAFETENSORS_HEADER}" if n > _MAX_SAFETENSORS_HEADER else ""))
        raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise bad("the header is not valid (or too deeply nested) JSON") from None
        if not isinstance(header, dict):
            raise bad("the header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(x, str) for x in meta.values()):
            raise ValueError(f"{where} is not an lstm_fast model file (no configuration in its metadata)")
        if "lstm_fast" not in meta:
            raise ValueError(f"{where} is not an lstm_fast model file (no configuration)")
        config = check_config(_json(meta["lstm_fast"], where), where)
        stored = meta.get("lstm_fast.digest")
        _check_budget(config, where, max_params, len(header))
        shapes = expected_shapes(config)
        _names_diff(where, list(header), shapes)
        want_dtype = _ST_DTYPES[config["dtype"]]
        itemsize = np.dtype(_NPY_DTYPES[config["dtype"]]).itemsize
        spans = []
        for name, shape in shapes.items():
            entry = header[name]
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise bad(f"tensor {name!r}: the entry must hold exactly dtype, shape and data_offsets")
            if entry["dtype"] not in _ST_KNOWN:
                raise bad(f"tensor {name!r}: unknown dtype {str(entry['dtype'])[:20]!r}")
            if entry["dtype"] != want_dtype:
                raise ValueError(f"{where}: tensor {name!r} is {entry['dtype']}, expected {want_dtype} "
                                 f"(the configuration's {config['dtype']})")
            got = entry["shape"]
            if not isinstance(got, list) or not all(type(d) is int for d in got) or tuple(got) != shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {str(got)[:60]}, expected {shape}")
            offs = entry["data_offsets"]
            if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs) \
                    or not 0 <= offs[0] <= offs[1]:
                raise bad(f"tensor {name!r}: data_offsets {str(offs)[:60]} are not [begin, end]")
            if offs[1] - offs[0] != math.prod(shape) * itemsize:
                raise bad(f"tensor {name!r}: data_offsets span {offs[1] - offs[0]} bytes, its shape "
                          f"needs {math.prod(shape) * itemsize}")
            spans.append((offs[0], offs[1], name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                raise bad(f"tensor {name!r} starts at byte {begin}, expected {pos} (tensors must "
                          f"be contiguous, without gaps or overlaps)")
            pos = end
        if 8 + n + pos != size:
            raise bad(f"the tensors end at byte {8 + n + pos}, the file has {size} bytes")
        arrays = {}
        for begin, end, name in spans:
            fh.seek(8 + n + begin)
            data = fh.read(end - begin)
            if len(data) != end - begin:
                raise bad(f"tensor {name!r} is truncated")
            arrays[name] = np.frombuffer(data, dtype=_NPY_DTYPES[config["dtype"]]).reshape(shapes[name])
    return config, arrays, stored, where


def load(path: Any, cls: Any, *, max_params: int = DEFAULT_MAX_PARAMS, allow_nonfinite: bool = False) -> Any:
    """A `cls` (lf.LSTM) from a model file: what ``lstm_fast.load`` does (its docstring says how)."""
    # a count, not a dimension: not capped as sizes are (a 4096x4096x4 model has 537M parameters)
    if isinstance(max_params, (bool, np.bool_)) or not isinstance(max_params, (int, np.integer)):
        raise TypeError(f"max_params must be an int, got {max_params!r} ({type(max_params).__name__})")
    if max_params < 1:
        raise ValueError(f"max_params must be >= 1, got {max_params}")
    max_params = int(max_params)
    if not isinstance(allow_nonfinite, (bool, np.bool_)):
        raise TypeError(f"allow_nonfinite must be a bool, got {allow_nonfinite!r}")
    path = os.fspath(path) if not isinstance(path, str) else path
    if _suffix(path) == ".npz":
        config, arrays, stored, where = _load_npz(path, max_params)
    else:
        try:
            config, arrays, stored, where = _load_safetensors(path, max_params)
        except _PASS:
            raise
        except ValueError:
            raise
        except Exception as exc:   # OSError of a device, ...
            raise ValueError(f"{path!r} is not a readable .safetensors model file: {exc}") from None
    _verify_digest(stored, config, arrays, where)
    _check_finite(arrays, where, allow_nonfinite)
    return _build(config, arrays, cls)


def _build(config, arrays, cls):
    model = cls(**{k: config[k] for k in CONFIG_KEYS}, dtype=config["dtype"])
    model.load_state_dict(arrays)
    if "precision" in config:   # converted again from the same float32 weights: the same bits
        return model.freeze(precision=config["precision"])
    return model


def _from_config(config, where, cls):
    check_config(config, where)
    return cls(**{k: config[k] for k in CONFIG_KEYS}, dtype=config["dtype"])


def _torch_kind(module, kinds):
    """'LSTM' or 'LSTMCell' for a torch module of that class or a TorchScript module made from one
    (torch.jit.script or torch.jit.trace); TypeError otherwise."""
    import torch

    for kind in kinds:
        if isinstance(module, getattr(torch.nn, kind)):
            return kind
    if isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in kinds:
        return module.original_name
    got = type(module).__name__
    if isinstance(module, torch.jit.ScriptModule):
        got += f" of a {getattr(module, 'original_name', '?')}"
    raise TypeError(f"expected a torch.nn.{' or torch.nn.'.join(kinds)} (or a TorchScript module "
                    f"scripted from one), got {got}")


def _torch_state(module):
    import torch

    state = module.state_dict()
    dtypes = {t.dtype for t in state.values()}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) != 1:
        raise TypeError(f"the torch module's parameters are {sorted(map(str, dtypes))}; convert it "
                        f"with .float() or .double()")
    dtype = np.float64 if dtypes == {torch.float64} else np.float32
    return {k: t.detach().cpu().numpy() for k, t in state.items()}, dtype


def from_torch(module, cls):
    """An lf.LSTM with the configuration and weights of a torch.nn.LSTM (float32 or float64), or
    of a TorchScript module scripted from one (``torch.jit.script``); `cls` is lf.LSTM."""
    _torch_kind(module, ("LSTM",))
    names = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
             "bidirectional", "proj_size")
    missing = [n for n in names if not hasattr(module, n)]
    if missing:   # torch.jit.trace keeps the weights but not the configuration
        raise TypeError(f"the TorchScript module does not keep the LSTM's {', '.join(missing)} "
                        f"(a traced module?): script the torch.nn.LSTM with torch.jit.script, or "
                        f"pass the torch.nn.LSTM itself")
    state, dtype = _torch_state(module)
    model = cls(int(module.input_size), int(module.hidden_size), num_layers=int(module.num_layers),
                 bias=bool(module.bias), batch_first=bool(module.batch_first),
                 dropout=float(module.dropout), bidirectional=bool(module.bidirectional),
                 proj_size=int(module.proj_size), dtype=dtype)
    model.load_state_dict(state)
    return model


def cell_from_torch(module, cls):
    """An lf.LSTMCell with the weights of a torch.nn.LSTMCell (or a TorchScript module scripted
    or traced from one); `cls` is lf.LSTMCell."""
    _torch_kind(module, ("LSTMCell",))
    state, dtype = _torch_state(module)
    if "weight_ih" not in state or "weight_hh" not in state:
        raise TypeError(f"the LSTMCell module has no weight_ih/weight_hh (its state: {list(state)})")
    four_h, input_size = state["weight_ih"].shape
    cell = cls(input_size, four_h // 4, bias="bias_ih" in state, dtype=dtype)
    cell.load_state_dict(state)
    return cell


class KerasLSTM:
    """A Keras 3 LSTM layer (or Bidirectional wrapper) on lstm_fast: call it like the Keras layer.

    ``out = layer(x, initial_state=None, mask=None)`` with x (B, T, I) returns what the Keras layer
    returns: the last output or the whole sequence (``return_sequences``), then the final states
    (``return_state``), as a list when there is more than one array. ``go_backwards`` reads the
    sequence from its end (and returns the outputs in that order, as Keras does).

    Bidirectional: ``merge_mode`` "concat", "sum", "ave", "mul", or None (the two directions
    returned separately, ``[forward, backward]`` followed by the states ``h_f, c_f, h_b, c_b``);
    ``initial_state`` is the list ``[h_f, c_f, h_b, c_b]`` as in Keras.

    ``mask`` (B, T) of booleans: right-padded masks (each row True for its first steps, then False)
    are supported; they become per-sequence lengths. As in Keras, the state stops at a sequence's
    last valid step, and the outputs at masked steps repeat the last valid output, or are 0 with
    ``zero_output_for_mask`` (Bidirectional sets that flag to ``return_sequences``); a
    ``go_backwards`` layer outputs 0 at the masked steps it meets first. Masks with gaps (a False
    followed by a True) raise ValueError.

    ``stateful=True`` layers keep their final states between calls as Keras does: each call starts
    from the previous call's final states (from the Keras layer's current states at conversion),
    the batch size is fixed, and ``reset_states()`` sets them to zero. ``states`` returns a copy.

    ``.model`` is the lf.LSTM underneath (batch_first=True).
    """

    def __init__(self, model, return_sequences, return_state, go_backwards, merge_mode=None,
                 bidirectional=False, stateful=False, zero_output_for_mask=False, states=None):
        self.model = model
        self.return_sequences = return_sequences
        self.return_state = return_state
        self.go_backwards = go_backwards
        self.merge_mode = merge_mode
        self.bidirectional = bidirectional
        self.stateful = stateful
        self.zero_output_for_mask = zero_output_for_mask
        self._states = states     # stateful: (h, c) of shape (D, B, H), or None before a call

    # ------------------------------------------------------------------ stateful layers
    @property
    def states(self):
        """A stateful layer's current states as Keras orders them ([h, c] or [h_f, c_f, h_b, c_b]),
        copies; None before the first call (zeros then) or for a stateless layer."""
        if self._states is None:
            return None
        h, c = self._states
        return [a for d in range(h.shape[0]) for a in (h[d].copy(), c[d].copy())]

    def reset_states(self):
        """Zero the carried states of a stateful layer (Keras' ``reset_states``); no-op otherwise."""
        if self._states is not None:
            self._states = tuple(np.zeros_like(a) for a in self._states)

    reset_state = reset_states

    # ------------------------------------------------------------------ a call
    def _initial(self, initial_state, batch):
        n_dirs = 2 if self.bidirectional else 1
        dt = self.model.dtype
        if initial_state is None:
            if self.stateful and self._states is not None:
                h, c = self._states
                if h.shape[1] != batch:
                    raise ValueError(f"this stateful layer carries states for a batch of {h.shape[1]} "
                                     f"sequences, got {batch} (Keras fixes a stateful layer's batch "
                                     f"size; call reset_states() does not change it)")
                return h, c
            return None
        if not isinstance(initial_state, (list, tuple)) or len(initial_state) != 2 * n_dirs:
            got = len(initial_state) if isinstance(initial_state, (list, tuple)) else type(initial_state).__name__
            raise ValueError(f"initial_state must be a list of {2 * n_dirs} arrays "
                             f"({'[h_f, c_f, h_b, c_b]' if n_dirs == 2 else '[h, c]'}) of shape "
                             f"(batch, units), got {got}")
        arrays = [v.float_array(_to_numpy(a), "initial_state", dt) for a in initial_state]
        H = self.model.hidden_size
        for a in arrays:
            v.shape(a, (batch, H), "initial_state entry", "batch, units")
        return np.stack(arrays[0::2]), np.stack(arrays[1::2])

    def __call__(self, x, initial_state=None, mask=None):
        x = _to_numpy(x)
        if x.ndim != 3 or x.shape[2] != self.model.input_size:
            raise ValueError(f"x has shape {x.shape}, expected (batch, timesteps, {self.model.input_size})")
        B, T = x.shape[0], x.shape[1]
        hx = self._initial(initial_state, B)
        lengths = None if mask is None else _mask_lengths(mask, B, T)
        run_len = None if lengths is None else np.maximum(lengths, 1)
        xs = x
        if self.go_backwards:
            if lengths is None:
                xs = x[:, ::-1]
            else:   # each sequence's valid steps, last first (the masked steps hold the state)
                k = np.arange(T)[None, :]
                idx = np.where(k < run_len[:, None], run_len[:, None] - 1 - k, k)
                xs = np.take_along_axis(x, idx[:, :, None], axis=1)
        out, (h_n, c_n) = self.model(xs, hx, run_len)
        H = self.model.hidden_size
        if lengths is not None and (lengths == 0).any():   # fully masked rows: nothing runs
            empty = lengths == 0
            out[empty] = 0
            if hx is None:
                h_n[:, empty] = 0
                c_n[:, empty] = 0
            else:
                h_n[:, empty] = hx[0][:, empty]
                c_n[:, empty] = hx[1][:, empty]
        if self.stateful:
            self._states = (h_n.copy(), c_n.copy())
        dirs = [out[..., d * H:(d + 1) * H] for d in range(h_n.shape[0])]
        seqs, lasts = [], []
        for d, seq in enumerate(dirs):
            backwards = self.go_backwards or d == 1   # d == 1: Keras' go_backwards backward layer
            zero = self.zero_output_for_mask
            h_last = h_n[d].copy()    # the last valid output; 0 for a fully masked row
            if lengths is not None:
                h_last[lengths == 0] = 0
            if lengths is not None:
                past = np.arange(T)[None, :] >= lengths[:, None]
                if not backwards and not zero:   # masked steps repeat the last valid output
                    seq = np.where(past[:, :, None], h_last[:, None, :], seq)
                elif backwards and d == 0:       # go_backwards: masked steps come first, 0
                    k = np.arange(T)[None, :] - (T - lengths[:, None])
                    seq = np.take_along_axis(seq, np.clip(k, 0, T - 1)[:, :, None], axis=1)
                    seq = np.where((k < 0)[:, :, None], 0, seq)
            seqs.append(seq)
            if not backwards and lengths is not None and zero:   # the last step is masked: 0
                h_last[lengths < T] = 0
            lasts.append(h_last)
        outs = seqs if self.return_sequences else lasts
        states = [a for d in range(h_n.shape[0]) for a in (h_n[d], c_n[d])]
        if self.bidirectional:
            fwd, bwd = outs
            if self.merge_mode is None:
                merged = [np.ascontiguousarray(fwd), np.ascontiguousarray(bwd)]
            else:
                merged = [{"concat": lambda: np.concatenate([fwd, bwd], -1), "sum": lambda: fwd + bwd,
                           "ave": lambda: (fwd + bwd) / 2, "mul": lambda: fwd * bwd}[self.merge_mode]()]
            result = merged + states if self.return_state else merged
            return result if len(result) > 1 else result[0]
        seq = np.ascontiguousarray(outs[0])
        if self.return_state:
            return [seq] + states
        return seq


def _to_numpy(value):
    if hasattr(value, "detach"):      # a torch tensor (Keras' torch backend)
        value = value.detach().cpu().numpy()
    elif not isinstance(value, np.ndarray) and hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def _mask_lengths(mask, batch, seq_len):
    """Lengths (B,) of a right-padded Keras mask (B, T); masks with gaps are refused."""
    m = _to_numpy(mask)
    if m.shape != (batch, seq_len):
        raise ValueError(f"mask has shape {m.shape}, expected (batch, timesteps) = ({batch}, {seq_len})")
    if m.dtype != np.bool_:
        if m.dtype.kind not in "biuf" or not np.isin(m, (0, 1)).all():
            raise TypeError(f"mask must hold booleans (or 0/1), got dtype {m.dtype}")
        m = m.astype(bool)
    lengths = m.sum(axis=1).astype(np.intp)
    right_padded = m == (np.arange(seq_len)[None, :] < lengths[:, None])
    if not right_padded.all():
        row = int(np.flatnonzero(~right_padded.all(axis=1))[0])
        raise ValueError(f"mask row {row} is not right-padded (True for the first steps, then "
                         f"False): {m[row].astype(int).tolist()}; masks with gaps or left padding "
                         f"have no lengths equivalent")
    return lengths


_KERAS_ACCEPTED = "a built keras.layers.LSTM, or keras.layers.Bidirectional around an LSTM"


def _keras_kind(layer):
    names = [c.__name__ for c in type(layer).__mro__]
    what = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if "LSTM" in names:
        return "LSTM"
    if "Bidirectional" in names:
        inner = getattr(layer, "forward_layer", None)
        if inner is None or "LSTM" not in [c.__name__ for c in type(inner).__mro__]:
            raise TypeError(f"from_keras takes {_KERAS_ACCEPTED}; got a Bidirectional wrapper around "
                            f"{type(inner).__name__}, which is not an LSTM")
        return "Bidirectional"
    hint = ""
    if "Sequential" in names or "Functional" in names or "Model" in names:
        hint = ("; for a model, convert its LSTM layers one by one (model.layers) and a Dense head "
                "with lf.Linear: see docs/keras.md")
    elif names[0] in ("GRU", "SimpleRNN", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"):
        hint = f"; lstm_fast runs LSTM cells only, a {names[0]} has other gate equations"
    elif "Dense" in names:
        hint = ("; a Dense layer maps to lf.Linear: Linear(kernel.shape[0], kernel.shape[1]) "
                "with weight = kernel.T, bias = bias (see docs/keras.md)")
    raise TypeError(f"from_keras takes {_KERAS_ACCEPTED}; got {what}{hint}")


def _keras_weights(layer):
    if not getattr(layer, "built", True) or not layer.get_weights():
        raise ValueError(f"the Keras layer {layer.name!r} is not built (it has no weights yet): call "
                         f"it on an input or layer.build((None, timesteps, features)) first")
    cfg = layer.get_config()
    act, rec = cfg.get("activation"), cfg.get("recurrent_activation")
    if act != "tanh" or rec != "sigmoid":
        raise ValueError(f"only activation='tanh' with recurrent_activation='sigmoid' maps to "
                         f"torch's LSTM; the layer has {act!r} / {rec!r}")
    weights = [np.asarray(w) for w in layer.get_weights()]
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cfg.get("use_bias", True) else None
    return cfg, kernel, recurrent, bias


def _keras_states(layers, dt):
    """A stateful layer's current states as (h, c) of shape (D, B, H), or None before a build."""
    per = []
    for lay in layers:
        st = getattr(lay, "states", None)
        if st is None or any(s is None for s in st):
            return None
        per.append([np.array(_to_numpy(getattr(s, "value", s)), dt) for s in st])
    return np.stack([p[0] for p in per]), np.stack([p[1] for p in per])


def from_keras(layer, dtype, cls):
    """A KerasLSTM (callable like the layer) from a Keras 3 ``LSTM`` layer or ``Bidirectional(LSTM)``.

    Keras' kernel (I, 4U), recurrent_kernel (U, 4U) and single bias (4U) share torch's gate order
    i, f, c, o: W_ih = kernel.T, W_hh = recurrent_kernel.T, b_ih = bias, b_hh = 0. The layer must
    be built; anything but an LSTM or a Bidirectional LSTM raises TypeError saying what it got.
    `cls` is lf.LSTM.
    """
    wrapper = None
    if _keras_kind(layer) == "Bidirectional":
        wrapper = layer
        fwd, bwd = layer.forward_layer, layer.backward_layer
        layers = [fwd, bwd]
    else:
        layers = [layer]
    parts = [_keras_weights(lay) for lay in layers]
    cfg0, kernel0, _, bias0 = parts[0]
    units, input_size = cfg0["units"], kernel0.shape[0]
    dt = np.dtype(dtype) if dtype is not None else (np.float64 if kernel0.dtype == np.float64 else np.float32)
    if wrapper is not None and any(p[0].get("go_backwards") for p in parts[:1]):
        raise ValueError("a Bidirectional wrapper around a go_backwards layer does not map")
    model = cls(input_size, units, bias=bias0 is not None, batch_first=True,
                 bidirectional=wrapper is not None, dtype=dt)
    state = {}
    for d, (cfg, kernel, recurrent, bias) in enumerate(parts):
        sfx = "_l0" + ("_reverse" if d else "")
        state["weight_ih" + sfx] = kernel.T
        state["weight_hh" + sfx] = recurrent.T
        if bias is not None:
            state["bias_ih" + sfx] = bias
            state["bias_hh" + sfx] = np.zeros_like(bias)
    model.load_state_dict(state)
    stateful = bool(cfg0.get("stateful", False))
    states = _keras_states(layers, dt) if stateful else None
    zero = bool(getattr(layers[0], "zero_output_for_mask", cfg0.get("zero_output_for_mask", False)))
    if wrapper is not None:
        return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                         False, merge_mode=wrapper.merge_mode, bidirectional=True, stateful=stateful,
                         zero_output_for_mask=zero, states=states)
    return KerasLSTM(model, cfg0.get("return_sequences", False), cfg0.get("return_state", False),
                     cfg0.get("go_backwards", False), stateful=stateful, zero_output_for_mask=zero,
                     states=states)


def getstate(model):
    """Pickle state of an LSTM: configuration + weights, nothing else (no kernel objects)."""
    return {"config": model_config(model), "state": model.state_dict()}


def setstate(model, state, cls):
    """Restore a pickled `cls` (lf.LSTM) into `model` (unpickling builds it without __init__)."""
    fresh = _from_config(state["config"], "the pickled model", cls)
    fresh.load_state_dict(state["state"])
    model.__dict__.update(fresh.__dict__)
    if not isinstance(model, cls):
        raise TypeError(f"setstate needs an {cls.__name__}")
