"""``denser``: a DENSER network from its Keras HDF5 file, as an equivalent torch module.

The DENSER authors publish their trained CIFAR-10 networks as Keras 2 ``.hdf5`` files: the
architecture as JSON in the file's ``model_config`` attribute, the weights in
``model_weights/<layer>/`` (Keras 2 names them ``conv2d_1/kernel:0``, Keras 3
``conv2d/kernel``; both are read). Nothing in the file is executed: Lambda layers are
mapped to known operations by the names their code refers to.

Conversion: channels-last kernels are transposed to torch's layout, ``same`` padding is
TensorFlow's (extra row/column at the bottom/right), average pooling ignores padding, and
Flatten flattens in channels-last order so that dense weights apply unchanged. The module
takes [0, 1] NCHW images and subtracts the training set's per-pixel mean inside (the
published models' preprocessing). The final softmax is dropped so the module returns
logits (``strip_softmax=False`` keeps Keras' probabilities).

Taps are the Keras layer names (``conv2d_1``, ``max_pooling2d_1``, ``dense_2``, ...).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advlens._optional import require
from advlens.data import load_dataset
from advlens.errors import ConfigError
from advlens.models.base import ModelRequest

SUPPORTED = (
    "InputLayer",
    "Conv2D",
    "MaxPooling2D",
    "AveragePooling2D",
    "Dense",
    "BatchNormalization",
    "Dropout",
    "Activation",
    "Flatten",
    "Lambda",
    "Concatenate",
)
MEAN_FILES = ("{stem}.mean.npy", "{stem}_mean.npy", "mean.npy", "x_mean.npy")


# --------------------------------------------------------------------------- activations


def activation(name: str | dict[str, Any] | None) -> nn.Module:
    """Keras activation (string or serialized dict) as a module; softmax over channels."""
    if isinstance(name, dict):  # Keras 3 may serialize {"class_name": "function", "config": "relu"}
        name = name.get("config") if isinstance(name.get("config"), str) else name.get("class_name")
    name = (name or "linear").lower()
    if name not in _ACTIVATIONS:
        raise ConfigError(
            f"DENSER/Keras activation {name!r} is not supported; known: {', '.join(_ACTIVATIONS)}"
        )
    return Act(name)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=1 if x.ndim == 4 else -1)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Keras' l2_normalize (axis -1: channels) divides by sqrt(max(sum(x^2), 1e-12)).
    dim = 1 if x.ndim == 4 else -1
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=1e-12))


_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": F.relu,
    "elu": F.elu,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "softmax": _softmax,
    "swish": F.silu,
    "silu": F.silu,
}


class Act(nn.Module):
    """An element-wise (or channel softmax) activation by Keras name."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fn = _ACTIVATIONS[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


# --------------------------------------------------------------------------- layers


def _tf_same_pads(
    size: tuple[int, int], kernel, stride, dilation=(1, 1)
) -> tuple[int, int, int, int]:
    """F.pad tuple (left, right, top, bottom) for TensorFlow's ``same`` padding."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return (left, right, top, bottom)


class Conv(nn.Module):
    """Keras Conv2D (channels-last kernel converted), TF padding and its fused activation."""

    def __init__(self, cfg: dict, weights: dict[str, np.ndarray]):
        super().__init__()
        kernel = weights["kernel"]  # (kh, kw, in, out)
        self.kernel_size = tuple(kernel.shape[:2])
        self.stride = tuple(cfg.get("strides", (1, 1)))
        self.dilation = tuple(cfg.get("dilation_rate", (1, 1)))
        self.same = cfg.get("padding", "valid") == "same"
        if cfg.get("groups", 1) != 1:
            raise ConfigError(f"Conv2D {cfg.get('name')!r}: grouped convolutions are not supported")
        self.conv = nn.Conv2d(
            kernel.shape[2],
            kernel.shape[3],
            self.kernel_size,
            self.stride,
            0,
            self.dilation,
            bias="bias" in weights,
        )
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            if self.conv.bias is not None:  # made when the weights have a bias
                self.conv.bias.copy_(torch.from_numpy(weights["bias"]))
        self.act = activation(cfg.get("activation"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = F.pad(
                x,
                _tf_same_pads(
                    (x.shape[-2], x.shape[-1]), self.kernel_size, self.stride, self.dilation
                ),
            )
        return self.act(self.conv(x))


class Pool(nn.Module):
    """Keras Max/AveragePooling2D; ``same`` padding never counts as data (as in TensorFlow)."""

    def __init__(self, cfg: dict, kind: str):
        super().__init__()
        size = cfg.get("pool_size", (2, 2))
        self.kernel = tuple(size) if isinstance(size, list | tuple) else (size, size)
        stride = cfg.get("strides") or self.kernel
        self.stride = tuple(stride) if isinstance(stride, list | tuple) else (stride, stride)
        self.same = cfg.get("padding", "valid") == "same"
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = (
            _tf_same_pads((x.shape[-2], x.shape[-1]), self.kernel, self.stride)
            if self.same
            else (0, 0, 0, 0)
        )
        if self.kind == "max":
            if any(pads):
                x = F.pad(x, pads, value=float("-inf"))
            return F.max_pool2d(x, self.kernel, self.stride)
        if not any(pads):
            return F.avg_pool2d(x, self.kernel, self.stride)
        total = F.avg_pool2d(F.pad(x, pads), self.kernel, self.stride, divisor_override=1)
        ones = F.pad(torch.ones_like(x[:1, :1]), pads)
        count = F.avg_pool2d(ones, self.kernel, self.stride, divisor_override=1)
        return total / count


class Dense(nn.Module):
    """Keras Dense: kernel (in, out) -> weight (out, in); on 4-D input it acts on channels."""

    def __init__(self, cfg: dict, weights: dict[str, np.ndarray]):
        super().__init__()
        kernel = weights["kernel"]
        self.linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias="bias" in weights)
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            if "bias" in weights:
                self.linear.bias.copy_(torch.from_numpy(weights["bias"]))
        self.act = activation(cfg.get("activation"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.act(self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return self.act(self.linear(x))


class BatchNorm(nn.Module):
    """Keras BatchNormalization over the channel axis, in inference mode."""

    gamma: torch.Tensor  # buffers, registered in __init__
    beta: torch.Tensor
    moving_mean: torch.Tensor
    moving_variance: torch.Tensor

    def __init__(self, cfg: dict, weights: dict[str, np.ndarray]):
        super().__init__()
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, 3, 1):
            raise ConfigError(
                f"BatchNormalization {cfg.get('name')!r}: axis {axis} is not the channel axis"
            )
        mean = weights["moving_mean"]
        n = mean.shape[0]
        self.eps = float(cfg.get("epsilon", 1e-3))
        for key, default in (
            ("gamma", 1.0),
            ("beta", 0.0),
            ("moving_mean", 0.0),
            ("moving_variance", 1.0),
        ):
            value = weights.get(key, np.full(n, default, np.float32))
            self.register_buffer(key, torch.from_numpy(np.asarray(value, np.float32).copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.moving_mean, self.moving_variance, self.gamma, self.beta, False, 0.0, self.eps
        )


class Flatten(nn.Module):
    """Keras Flatten: channels-last order, so Dense kernels saved by Keras apply unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.permute(0, 2, 3, 1)
        return x.reshape(len(x), -1)


class Concat(nn.Module):
    """Keras Concatenate on the channel axis (-1 in Keras' channels-last layout)."""

    def __init__(self, cfg: dict):
        super().__init__()
        if cfg.get("axis", -1) not in (-1, 3):
            raise ConfigError(
                f"Concatenate {cfg.get('name')!r}: only the channel axis is supported"
            )

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1 if xs[0].ndim == 4 else -1)


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# Lambda layers: never executed; their code's names pick a known op.
_LAMBDA_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "l2_normalize": _l2_normalize,
    "softmax": _softmax,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": F.elu,
    "softplus": F.softplus,
    "abs": torch.abs,
    "square": torch.square,
}
_BENIGN = {"backend", "keras", "tensorflow", "ops", "self", "inputs", "input", "tensor"}


class LambdaOp(nn.Module):
    """A Keras Lambda layer mapped to a known operation (``model.lambda_map`` or its name)."""

    def __init__(self, cfg: dict, mapped: str | None = None):
        super().__init__()
        self.op = lambda_op(cfg, mapped)
        self.fn = _LAMBDA_OPS[self.op]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.op


_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{2,}")


def _marshal_identifiers(raw: bytes) -> set[str]:
    """Identifier strings stored in marshalled code (Python 2 or 3), found by their records.

    A string record is a type byte (possibly with the 0x80 reference flag) then its length:
    one byte for short ASCII (``z``/``Z``), four for the others (``s t u a A``). File names,
    ``<lambda>`` and qualified names are not identifiers and drop out.
    """
    found = set()
    for i, byte in enumerate(raw[:-1]):
        kind = byte & 0x7F
        if kind in b"zZ":
            start, length = i + 2, raw[i + 1]
        elif kind in b"stuaA" and i + 5 <= len(raw):
            start, length = i + 5, int.from_bytes(raw[i + 1 : i + 5], "little")
            if length > 256:
                continue
        else:
            continue
        text = raw[start : start + length]
        if len(text) == length and _IDENT.fullmatch(text):
            found.add(text.decode())
    return found


def lambda_op(cfg: dict, mapped: str | None = None) -> str:
    """The known op of a Lambda layer: ``mapped`` (from ``model.lambda_map``), else the name of
    a Keras 3 named function. Lambda code is never executed nor guessed from: the names it
    mentions only suggest a mapping in the error (``x * 2`` mentions none, ``relu(x) * 0.5``
    only relu)."""
    name = cfg.get("name")
    known = ", ".join(_LAMBDA_OPS)
    if mapped is not None:
        if mapped not in _LAMBDA_OPS:
            raise ConfigError(
                f"model.lambda_map.{name} = {mapped!r}: not a known operation; known: {known}"
            )
        return mapped
    fn = cfg.get("function")
    if cfg.get("arguments"):
        raise ConfigError(f"Lambda {name!r} takes arguments {cfg['arguments']}; not supported")
    if isinstance(fn, dict) and isinstance(fn.get("config"), dict):  # Keras 3 __lambda__
        code = fn["config"].get("code", "")
    elif isinstance(fn, dict):  # Keras 3 named function
        code = str(fn.get("config", ""))
    elif isinstance(fn, list | tuple) and fn:  # Keras 2: [base64 marshal, defaults, closure]
        code = fn[0]
    else:
        code = str(fn or "")
    if cfg.get("function_type") == "function" or (
        isinstance(fn, dict) and fn.get("class_name") == "function"
    ):
        names = {code.rsplit(".", 1)[-1]}  # a named function: its name is all there is
        if len(names & set(_LAMBDA_OPS)) == 1:
            return names.pop()
    else:
        try:
            raw = base64.b64decode(code, validate=False)
        except (ValueError, TypeError):
            raw = b""
        names = _marshal_identifiers(raw) - _BENIGN
    ops = sorted(n for n in names if n in _LAMBDA_OPS)
    calls = ", ".join(sorted(names)) or "no known function"
    guess = ops[0] if len(ops) == 1 and len(names) == 1 else "identity"
    raise ConfigError(
        f"Lambda layer {name!r} runs Python code (it mentions {calls}) that advlens does not "
        f"execute or guess. If it computes one of the known operations ({known}), say which: "
        f'model.lambda_map = {{ {name} = "{guess}" }} (or --set model.lambda_map.{name}={guess})'
    )


# --------------------------------------------------------------------------- the graph


class KerasNet(nn.Module):
    """A Keras functional graph run in NCHW, with the input preprocessing inside."""

    mean: torch.Tensor  # a buffer: the per-pixel mean subtracted first

    def __init__(
        self,
        nodes: list[tuple[str, str, nn.Module, list[str]]],
        input_name: str,
        output_name: str,
        in_shape: tuple[int, ...],
        mean: np.ndarray | None,
    ):
        super().__init__()
        self.graph: list[tuple[str, str, list[str]]] = []  # (keras name, attribute, inputs)
        taps, auto = [], []
        for name, kind, module, inputs in nodes:
            attr = name
            if hasattr(self, name) or not name.isidentifier():  # e.g. a layer named "training"
                attr = f"k{len(self.graph)}_" + re.sub(r"\W", "_", name)
            self.add_module(attr, module)
            self.graph.append((name, attr, inputs))
            if kind not in ("Dropout", "Flatten"):
                taps.append(attr)
            if kind in ("Conv2D", "Dense", "MaxPooling2D", "AveragePooling2D", "Concatenate"):
                auto.append(attr)
        self.advlens_taps = tuple(taps)
        self.advlens_auto = tuple(auto)
        self.input_name, self.output_name = input_name, output_name
        self.in_shape = tuple(in_shape)
        m = np.zeros(self.in_shape, np.float32) if mean is None else mean
        self.register_buffer("mean", torch.from_numpy(np.ascontiguousarray(m, np.float32))[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x - self.mean}
        for name, attr, inputs in self.graph:
            values[name] = getattr(self, attr)(*[values[i] for i in inputs])
        return values[self.output_name]


def _decode(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def _layers_of(config: dict) -> tuple[list[dict], bool]:
    """(layer dicts, sequential?) from a Keras 2 or 3 model config."""
    cls = config.get("class_name")
    inner = config.get("config")
    if cls == "Sequential":
        layers = inner if isinstance(inner, list) else (inner or {}).get("layers", [])
        if isinstance(layers, list):
            return layers, True
    if cls in ("Model", "Functional") and isinstance(inner, dict):
        if isinstance(inner.get("layers"), list):
            return inner["layers"], False
    raise ConfigError(
        f"model config of class {cls!r}: expected a Keras Sequential or functional Model "
        "with a list of layers"
    )


def _inbound(layer: dict) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 2 nested lists or Keras 3 keras_history)."""
    nodes = layer.get("inbound_nodes") or []
    if len(nodes) > 1:
        raise ConfigError(
            f"layer {layer.get('name')!r} is called {len(nodes)} times; shared layers are not supported"
        )
    names: list[str] = []

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                names.append(obj["config"]["keras_history"][0])
            else:
                for v in obj.values():
                    walk(v)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
                names.append(obj[0])  # Keras 2: [name, node_index, tensor_index, kwargs]
            else:
                for v in obj:
                    walk(v)

    if nodes:
        walk(nodes[0])
    return names


def _weights(h5, name: str) -> dict[str, np.ndarray]:
    """A layer's weights by short name (kernel, bias, gamma, ...), Keras 2 or 3 layout."""
    root = h5["model_weights"] if "model_weights" in h5 else h5
    if name not in root:
        return {}
    group = root[name]
    out = {}
    for wname in group.attrs.get("weight_names", []):
        wname = _decode(wname)
        short = wname.split("/")[-1].split(":")[0]
        out[short] = np.asarray(group[wname], dtype=np.float32)
    return out


def _input_shape(layer: dict) -> tuple[int, ...] | None:
    cfg = layer.get("config", {})
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    return tuple(int(s) for s in shape[1:]) if shape else None


def load_denser(
    path: str | Path,
    mean: np.ndarray | float | str | Path | None = None,
    *,
    strip_softmax: bool = True,
    lambda_map: dict[str, str] | None = None,
) -> KerasNet:
    """Read a DENSER (or any supported Keras) HDF5 file into a :class:`KerasNet` in eval mode.

    ``mean``: the per-pixel training mean subtracted from [0, 1] images, as an array or .npy
    path, shaped (H, W, C) as Keras keeps it, (C, H, W), (C,) or a scalar; ``"none"`` for no
    preprocessing; None: look beside the file (``<stem>.mean.npy``, ``mean.npy``) or in it
    (a dataset named ``mean``). ``lambda_map``: Lambda layer name -> known operation.
    A malformed file (architecture not JSON, weights missing or of the wrong shape) raises
    ConfigError naming the file and the layer.
    """

    h5py = require("h5py", "DENSER models")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint = {str(path)!r}: DENSER HDF5 file not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ConfigError(f"model.checkpoint = {str(path)!r}: not an HDF5 file ({exc})") from None
    with h5:
        if "model_config" not in h5.attrs:
            raise ConfigError(
                f"{path}: no 'model_config' attribute; a weights-only file has no architecture "
                "(save the whole model: model.save('net.h5'))"
            )
        try:
            config = json.loads(_decode(h5.attrs["model_config"]))
        except ValueError as exc:
            raise ConfigError(f"{path}: 'model_config' is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise ConfigError(
                f"{path}: 'model_config' is a JSON {type(config).__name__}, not a Keras model "
                "config (an object with class_name and config)"
            )
        lambda_map = dict(lambda_map or {})
        try:
            layers, sequential = _layers_of(config)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        nodes: list[tuple[str, str, nn.Module, list[str]]] = []
        prev = input_name = ""  # the input layer's name (Keras 2 Sequential: the first layer)
        in_shape: tuple[int, ...] | None = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or "class_name" not in layer:
                raise ConfigError(f"{path}: layer {i} of 'model_config' has no class_name")
            kind, cfg = layer["class_name"], layer.get("config", {})
            name = cfg.get("name") or layer.get("name") or f"layer_{i}"
            if kind == "InputLayer":
                input_name, in_shape, prev = name, _input_shape(layer), name
                continue
            if not input_name:  # Keras 2 Sequential: the first layer carries the input shape
                input_name, in_shape, prev = "input", _input_shape(layer), "input"
            inputs = [prev] if sequential else _inbound(layer)
            mapped = lambda_map.pop(name, None) if kind == "Lambda" else None
            try:
                module = _convert(kind, cfg, lambda n=name: _weights(h5, n), mapped)
            except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(
                    f"{path}: layer {name!r} ({kind}) does not match its weights in the file "
                    f"({type(exc).__name__}: {exc}); the file is damaged or not a Keras model"
                ) from None
            nodes.append((name, kind, module, inputs))
            prev = name
        if lambda_map:
            raise ConfigError(
                f"model.lambda_map names {sorted(lambda_map)}, which are not Lambda layers of "
                f"{path.name}"
            )
        stored_mean = np.asarray(h5["mean"], np.float32) if "mean" in h5 else None
    if in_shape is None or len(in_shape) != 3:
        raise ConfigError(f"{path}: model input shape {in_shape} is not an (H, W, C) image")
    if sequential:
        output = nodes[-1][0]
    else:
        outs = config["config"].get("output_layers") or []
        output = _inbound({"inbound_nodes": [outs]})[-1] if outs else nodes[-1][0]
    if strip_softmax:
        _strip_softmax(nodes, output)
    h, w, c = in_shape
    m = _resolve_mean(mean, path, stored_mean, (c, h, w))
    net = KerasNet(nodes, input_name, output, (c, h, w), m).eval()
    try:  # a kernel of the wrong shape shows only when data flows through it
        with torch.no_grad():
            net(torch.zeros(1, c, h, w))
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise ConfigError(
            f"{path}: the layers do not fit together ({type(exc).__name__}: {exc}); a weight "
            "in the file has the wrong shape, or the file is damaged"
        ) from None
    return net


def _convert(kind: str, cfg: dict, weights, mapped: str | None = None) -> nn.Module:
    if cfg.get("data_format", "channels_last") != "channels_last":
        raise ConfigError(
            f"layer {cfg.get('name')!r}: only channels_last Keras models are supported"
        )
    if kind == "Conv2D":
        return Conv(cfg, weights())
    if kind == "Dense":
        return Dense(cfg, weights())
    if kind == "BatchNormalization":
        return BatchNorm(cfg, weights())
    if kind in ("MaxPooling2D", "AveragePooling2D"):
        return Pool(cfg, "max" if kind.startswith("Max") else "avg")
    if kind == "Activation":
        return activation(cfg.get("activation"))
    if kind == "Softmax":
        return Act("softmax")
    if kind == "Dropout":
        return Identity()
    if kind == "Flatten":
        return Flatten()
    if kind == "Lambda":
        return LambdaOp(cfg, mapped)
    if kind == "Concatenate":
        return Concat(cfg)
    raise ConfigError(
        f"Keras layer {cfg.get('name')!r} of type {kind} is not supported; supported: {', '.join(SUPPORTED)}"
    )


def _strip_softmax(nodes, output: str) -> None:
    """Return logits: drop the softmax of the output layer (fused or an Activation layer)."""
    for name, _kind, module, _inputs in nodes:
        if name != output:
            continue
        act = getattr(module, "act", module)
        if isinstance(act, Act) and act.name == "softmax":
            if module is act:
                module.fn, module.name = _ACTIVATIONS["linear"], "linear"
            else:
                module.act = Act("linear")


def _resolve_mean(mean, path: Path, stored, chw: tuple[int, int, int]) -> np.ndarray | None:
    if isinstance(mean, str) and mean.lower() == "none":
        return None
    if mean is None and stored is not None:
        mean = stored
    if mean is None:
        for pattern in MEAN_FILES:
            candidate = path.parent / pattern.format(stem=path.stem)
            if candidate.is_file():
                mean = candidate
                break
    if mean is None:
        raise ConfigError(
            f"DENSER model {path.name}: the per-pixel training mean is needed (the published models "
            "subtract it after scaling to [0, 1]). Set model.mean to a .npy file holding it "
            f"(shape (H, W, C)), put it beside the model as {path.stem}.mean.npy, or pass 'none'. "
            "Compute it with advlens.models.denser.training_mean(<CIFAR-10 folder>)."
        )
    if isinstance(mean, str | Path):
        try:
            mean = np.load(mean, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"model.mean = {str(mean)!r}: cannot read a .npy array ({exc})"
            ) from None
    m = np.asarray(mean, np.float32)
    c, h, w = chw
    if m.shape == (h, w, c):
        return m.transpose(2, 0, 1)
    if m.shape == (c, h, w):
        return m
    if m.shape in ((c,), (1,), ()):
        return np.broadcast_to(m.reshape(-1, 1, 1) if m.ndim else m, chw).copy()
    raise ConfigError(
        f"DENSER mean has shape {m.shape}; expected {(h, w, c)} (H, W, C) or {chw} or ({c},)"
    )


def training_mean(data_path: str, dataset: str = "cifar10") -> np.ndarray:
    """Per-pixel mean (H, W, C) of the [0, 1]-scaled training split, as DENSER computes it."""

    train = load_dataset(dataset, "train", data_path)
    return train.images.mean(axis=0, dtype=np.float64).astype(np.float32).transpose(1, 2, 0)


def build(request: ModelRequest) -> nn.Module:
    """The DENSER network in ``cfg.checkpoint`` (a Keras .h5/.hdf5 file)."""
    cfg = request.cfg
    if not cfg.checkpoint:
        raise ConfigError(
            "model.name = 'denser' needs model.checkpoint: the network's Keras .h5/.hdf5 file"
        )
    mean = getattr(cfg, "mean", None)
    net = load_denser(
        cfg.checkpoint,
        mean if mean else (None if request.weights else "none"),
        lambda_map=getattr(cfg, "lambda_map", None),
    )
    if tuple(net.in_shape) != request.in_shape:
        raise ConfigError(
            f"DENSER model {cfg.checkpoint} takes images {net.in_shape}, the dataset has {request.in_shape}"
        )
    return net
