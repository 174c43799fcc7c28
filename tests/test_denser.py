"""DENSER: Keras HDF5 files (Keras 3 written by Keras, Keras 2 layout written with h5py) vs Keras."""

from __future__ import annotations

import base64
import json
import marshal
import os

import numpy as np
import pytest
import torch

from advlens.config import ModelConfig
from advlens.errors import ConfigError
from advlens.models import build_model
from advlens.models.denser import _l2_normalize, lambda_op, load_denser
from advlens.models.taps import catalog, select_layers, tap_forward

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on torch: no TensorFlow needed
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these tests run Keras 3 on its torch backend", allow_module_level=True)
layers = keras.layers

# Keras' Variable.__array__ lacks numpy 2's copy keyword (keras internals, not advlens).
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

TOL = 1e-4


def randomize(model, seed=0):
    """Random weights everywhere, batch-norm statistics included (so nothing is an identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if isinstance(layer, layers.BatchNormalization):
            new = [
                rng.uniform(0.5, 1.5, w.shape) if i in (0, 3) else rng.uniform(-0.3, 0.3, w.shape)
                for i, w in enumerate(ws)
            ]
        else:
            new = [rng.normal(0, 0.3, w.shape) for w in ws]
        layer.set_weights([w.astype(np.float32) for w in new])
    return model


IDENTITY = {"lambda_1": "identity"}  # the test models' Lambda is x -> x, mapped explicitly


def denser_like(lam=lambda t: t):
    """A functional model with every DENSER layer type, odd SAME paddings and a merge."""
    inp = keras.Input((32, 32, 3), name="input_1")
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2d_1")(inp)
    b1 = layers.BatchNormalization(name="batch_normalization_1")(c1)
    p1 = layers.MaxPooling2D(3, strides=2, padding="same", name="max_pooling2d_1")(b1)  # 16x16
    c2 = layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False, name="conv2d_2")(
        p1
    )  # 8x8, pad 0/1
    a2 = layers.Activation("tanh", name="activation_1")(c2)
    # Stride 1: symmetric padding. (Asymmetric SAME average pooling: Keras 3's torch backend pads
    # by replicating edges where TensorFlow, which trained the published models, skips the
    # padding; test_same_average_pooling_follows_tensorflow checks advlens against TF's rule.)
    p2 = layers.AveragePooling2D(3, strides=1, padding="same", name="average_pooling2d_1")(a2)
    side = layers.MaxPooling2D(9, strides=1, name="max_pooling2d_2")(
        p1
    )  # DENSER's merge resize: 8x8
    m = layers.Concatenate(name="concatenate_1")([p2, side])
    d = layers.Dropout(0.3, name="dropout_1")(m)
    lam_out = layers.Lambda(lam, name="lambda_1")(d)
    p3 = layers.AveragePooling2D(2, name="average_pooling2d_2")(lam_out)
    f = layers.Flatten(name="flatten_1")(p3)
    h = layers.Dense(16, activation="relu", name="dense_1")(f)
    h = layers.BatchNormalization(name="batch_normalization_2")(h)
    h = layers.Dropout(0.5, name="dropout_2")(h)
    out = layers.Dense(10, activation="softmax", name="dense_2")(h)
    return randomize(keras.Model(inp, out))


def save_h5(model, path):
    model.save(str(path))  # the legacy HDF5 format, as the published models
    return path


def keras_predict(model, x_nhwc):
    return keras.ops.convert_to_numpy(model(x_nhwc, training=False))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(1)
    x = rng.random((4, 3, 32, 32), dtype=np.float32)
    mean = rng.uniform(0.3, 0.6, (32, 32, 3)).astype(np.float32)
    return x, mean


@pytest.fixture(scope="module")
def keras3_file(tmp_path_factory):
    model = denser_like()
    return model, save_h5(model, tmp_path_factory.mktemp("k3") / "train_0.hdf5")


def test_keras3_file_matches_keras(keras3_file, inputs):
    model, path = keras3_file
    x, mean = inputs
    expected = keras_predict(model, x.transpose(0, 2, 3, 1) - mean)
    net = load_denser(path, mean=mean, strip_softmax=False, lambda_map=IDENTITY)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < TOL
    logits_net = load_denser(
        path, mean=mean, lambda_map=IDENTITY
    )  # default: logits (softmax dropped)
    with torch.no_grad():
        probs = torch.softmax(logits_net(torch.from_numpy(x)), 1).numpy()
    assert np.abs(probs - expected).max() < TOL
    assert not np.allclose(probs.sum(1), 0) and np.abs(got.sum(1) - 1).max() < 1e-5


def test_every_tap_matches_keras_layer_output(keras3_file, inputs):
    model, path = keras3_file
    x, mean = inputs
    net = load_denser(path, mean=mean, lambda_map=IDENTITY)
    infos = catalog(net, (3, 32, 32))
    names = select_layers(infos, ["all"], include_input=False)
    assert "dropout_1" not in names and "flatten_1" not in names
    assert names[:3] == ["conv2d_1", "batch_normalization_1", "max_pooling2d_1"]
    assert {"conv2d_2", "concatenate_1", "dense_2"} <= set(
        select_layers(infos, ["auto"], include_input=False)
    )
    shapes = {i.name: i.shape for i in infos}
    assert shapes["concatenate_1"] == (14, 8, 8) and shapes["conv2d_2"] == (6, 8, 8)
    _, acts = tap_forward(net, torch.from_numpy(x), names[:-1])  # dense_2 differs: logits
    xk = x.transpose(0, 2, 3, 1) - mean
    for name in names[:-1]:
        sub = keras.Model(model.input, model.get_layer(name).output)
        ref = keras_predict(sub, xk)
        if ref.ndim == 4:
            ref = ref.transpose(0, 3, 1, 2)
        diff = np.abs(acts[name].numpy() - ref.reshape(len(x), -1)).max()
        assert diff < TOL, (name, diff)


def test_build_model_finds_mean_beside_file(keras3_file, inputs):
    model, path = keras3_file
    x, mean = inputs
    cfg = ModelConfig("denser", checkpoint=str(path), device="cpu", lambda_map=IDENTITY)
    mean_file = path.with_name(path.stem + ".mean.npy")
    try:
        with pytest.raises(ConfigError, match="per-pixel training mean"):
            build_model(cfg, "cifar10", (3, 32, 32), 10)
        np.save(mean_file, mean.transpose(2, 0, 1))  # (C, H, W) is accepted as well
        net = build_model(cfg, "cifar10", (3, 32, 32), 10)
    finally:
        mean_file.unlink(missing_ok=True)
    expected = keras_predict(model, x.transpose(0, 2, 3, 1) - mean)
    with torch.no_grad():
        probs = torch.softmax(net(torch.from_numpy(x)), 1).numpy()
    assert np.abs(probs - expected).max() < TOL
    with pytest.raises(ConfigError, match=r"takes images \(3, 32, 32\)"):
        build_model(cfg, "fashion-mnist", (1, 28, 28), 10, weights=False)


# --------------------------------------------------------------------------- Keras 2 layout


def _k2_layer(name, cls, config, inbound):
    cfg = {"name": name, "trainable": True, **config}
    return {
        "name": name,
        "class_name": cls,
        "config": cfg,
        "inbound_nodes": [[[i, 0, 0, {}] for i in inbound]] if inbound else [],
    }


def write_keras2_file(path, model, lam_code, sequential=False):
    """Write ``model`` as Keras 2.x did: JSON config in attrs, weights named ``<layer>/<w>:0``."""
    import h5py

    conv = dict(
        filters=4,
        kernel_size=[3, 3],
        strides=[2, 2],
        padding="same",
        data_format="channels_last",
        dilation_rate=[1, 1],
        activation="relu",
        use_bias=True,
    )
    spec = [
        ("conv2d_1", "Conv2D", conv, ["kernel", "bias"]),
        (
            "batch_normalization_1",
            "BatchNormalization",
            dict(axis=-1, momentum=0.99, epsilon=0.001, center=True, scale=True),
            ["gamma", "beta", "moving_mean", "moving_variance"],
        ),
        (
            "max_pooling2d_1",
            "MaxPooling2D",
            dict(pool_size=[2, 2], padding="valid", strides=[2, 2], data_format="channels_last"),
            [],
        ),
        (
            "lambda_1",
            "Lambda",
            dict(
                function=[lam_code, None, None],
                function_type="lambda",
                output_shape=None,
                output_shape_type="raw",
                arguments={},
            ),
            [],
        ),
        ("flatten_1", "Flatten", dict(data_format="channels_last"), []),
        ("dropout_1", "Dropout", dict(rate=0.5, noise_shape=None, seed=None), []),
        (
            "dense_1",
            "Dense",
            dict(units=10, activation="softmax", use_bias=True),
            ["kernel", "bias"],
        ),
    ]
    shape = [None, 16, 16, 3]
    if sequential:
        cfg_layers = [{"class_name": cls, "config": {"name": n, **c}} for n, cls, c, _ in spec]
        cfg_layers[0]["config"]["batch_input_shape"] = shape
        config = {"class_name": "Sequential", "config": cfg_layers}
    else:
        cfg_layers = [
            _k2_layer(
                "input_1",
                "InputLayer",
                {"batch_input_shape": shape, "dtype": "float32", "sparse": False},
                [],
            )
        ]
        prev = "input_1"
        for n, cls, c, _ in spec:
            cfg_layers.append(_k2_layer(n, cls, c, [prev]))
            prev = n
        config = {
            "class_name": "Model",
            "config": {
                "name": "model_1",
                "layers": cfg_layers,
                "input_layers": [["input_1", 0, 0]],
                "output_layers": [["dense_1", 0, 0]],
            },
        }
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.1.6"
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode()
        mw = f.create_group("model_weights")
        names = ([] if sequential else ["input_1"]) + [n for n, *_ in spec]
        mw.attrs["layer_names"] = [n.encode() for n in names]
        for n in names:
            g = mw.create_group(n)
            wnames = next((w for m, _, _, w in spec if m == n), [])
            g.attrs["weight_names"] = [f"{n}/{w}:0".encode() for w in wnames]
            values = model.get_layer(n).get_weights() if wnames else []
            for w, v in zip(wnames, values, strict=True):
                g.create_dataset(f"{n}/{w}:0", data=v)
    return path


def keras2_twin():
    """The same network in Keras 3, as the oracle for the Keras 2 file."""
    inp = keras.Input((16, 16, 3), name="input_1")
    h = layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="conv2d_1")(inp)
    h = layers.BatchNormalization(name="batch_normalization_1")(h)
    h = layers.MaxPooling2D(2, name="max_pooling2d_1")(h)
    h = layers.Lambda(lambda t: t, name="lambda_1")(h)
    h = layers.Flatten(name="flatten_1")(h)
    h = layers.Dropout(0.5, name="dropout_1")(h)
    out = layers.Dense(10, activation="softmax", name="dense_1")(h)
    return randomize(keras.Model(inp, out), seed=3)


@pytest.mark.parametrize("sequential", [False, True])
def test_keras2_layout_file(tmp_path, sequential):
    model = keras2_twin()
    code = base64.b64encode(marshal.dumps((lambda x: x).__code__)).decode()
    path = write_keras2_file(tmp_path / "net_1.hdf5", model, code, sequential=sequential)
    rng = np.random.default_rng(5)
    x = rng.random((3, 3, 16, 16), dtype=np.float32)
    mean = np.float32(0.47)
    expected = keras_predict(model, x.transpose(0, 2, 3, 1) - mean)
    net = load_denser(path, mean=np.array([mean]), strip_softmax=False, lambda_map=IDENTITY)
    with torch.no_grad():
        got = net(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < TOL
    assert [i.name for i in catalog(net, (3, 16, 16))][:2] == ["input", "conv2d_1"]


# --------------------------------------------------------------------------- Lambda and errors


def tf_same_pool(x, k, s, op):
    """TensorFlow's SAME pooling, written out: windows start at -pad_before; padding never counts."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, -(-h // s), -(-w // s)), np.float32)
    pads = [
        max((o - 1) * s + k - size, 0) // 2 for o, size in zip(out.shape[2:], (h, w), strict=True)
    ]
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            r0, c0 = i * s - pads[0], j * s - pads[1]
            win = x[:, :, max(r0, 0) : r0 + k, max(c0, 0) : c0 + k]
            out[:, :, i, j] = op(win, axis=(2, 3))
    return out


@pytest.mark.parametrize("k,s,size", [(3, 2, 8), (2, 1, 5), (3, 2, 7), (4, 3, 9)])
def test_same_pooling_follows_tensorflow(k, s, size):
    from advlens.models.denser import Pool

    x = np.random.default_rng(k * s).normal(size=(2, 3, size, size)).astype(np.float32)
    cfg = {"pool_size": [k, k], "strides": [s, s], "padding": "same"}
    for kind, op in (("avg", np.mean), ("max", np.max)):
        got = Pool(cfg, kind)(torch.from_numpy(x)).numpy()
        assert np.abs(got - tf_same_pool(x, k, s, op)).max() < 1e-6, kind


def test_lambda_ops_are_recognised_without_running_code():
    def code_of(fn):
        return {
            "name": "lambda_1",
            "function": [base64.b64encode(marshal.dumps(fn.__code__)).decode(), None, None],
            "function_type": "lambda",
            "arguments": {},
        }

    backend = None  # names only: the code is never executed
    # Never guessed from the code: x * 2 mentions no function, relu(x) * 0.5 only relu.
    for fn, hint in (
        (lambda x: x, "identity"),
        (lambda x: x * 2, "identity"),
        (lambda x: backend.relu(x) * 0.5, "relu"),
        (lambda x: backend.cumsum(x, axis=1), "identity"),
    ):
        with pytest.raises(ConfigError, match="does not execute or guess") as exc:
            lambda_op(code_of(fn))
        msg = str(exc.value)
        assert "l2_normalize, softmax, relu" in msg  # the known operations
        assert f'model.lambda_map = {{ lambda_1 = "{hint}" }}' in msg
    assert lambda_op(code_of(lambda x: x), "l2_normalize") == "l2_normalize"  # mapped
    with pytest.raises(ConfigError, match="lambda_map.lambda_1 = 'cumsum': not a known"):
        lambda_op(code_of(lambda x: x), "cumsum")
    x = torch.randn(2, 5, 3, 3)
    ref = x.numpy() / np.sqrt(np.maximum((x.numpy() ** 2).sum(1, keepdims=True), 1e-12))
    assert np.abs(_l2_normalize(x).numpy() - ref).max() < 1e-6


def test_unknown_keras3_lambda_is_refused(tmp_path):
    model = denser_like(lam=lambda t: keras.ops.cumsum(t, axis=-1))
    path = save_h5(model, tmp_path / "odd.h5")
    with pytest.raises(ConfigError, match="lambda_1.*cumsum"):
        load_denser(path, mean="none")
    with pytest.raises(ConfigError, match=r"lambda_map names \['lambda_9'\]"):
        load_denser(path, mean="none", lambda_map={"lambda_1": "identity", "lambda_9": "relu"})


def _h5_with_config(src, dst, model_config=None, drop=None, kernel=None):
    """A copy of the Keras file ``src`` with its architecture or weights damaged.

    ``kernel=(layer, axis)``: that layer's kernel grows by one along ``axis``.
    """
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        if model_config is not None:
            f.attrs["model_config"] = model_config
        root = f["model_weights"] if "model_weights" in f else f
        if drop:
            del root[drop]
        if kernel:
            layer, axis = kernel
            group = root[layer]
            names = [w.decode() if isinstance(w, bytes) else w for w in group.attrs["weight_names"]]
            wname = next(w for w in names if "kernel" in w)
            shape = list(group[wname].shape)
            shape[axis] += 1
            del group[wname]
            group[wname] = np.zeros(shape, np.float32)
    return dst


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ({"model_config": "{not json"}, "'model_config' is not valid JSON"),
        ({"model_config": "[1, 2]"}, "is a JSON list, not a Keras model config"),
        ({"model_config": '{"class_name": "Functional", "config": 3}'}, "with a list of layers"),
        ({"drop": "conv2d_1"}, "layer 'conv2d_1' (Conv2D) does not match its weights"),
        ({"kernel": ("conv2d_1", -1)}, "layer 'conv2d_1' (Conv2D) does not match its weights"),
        ({"kernel": ("dense_1", 0)}, "the layers do not fit together"),
    ],
)
def test_malformed_keras_files_are_refused_clearly(keras3_file, tmp_path, damage, needle):
    _, path = keras3_file
    bad = _h5_with_config(path, tmp_path / "bad.h5", **damage)
    with pytest.raises(ConfigError) as exc:
        load_denser(bad, mean="none", lambda_map=IDENTITY)
    assert needle in str(exc.value) and str(bad) in str(exc.value)


def test_bad_files(tmp_path):
    import h5py

    with pytest.raises(ConfigError, match="not found"):
        load_denser(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(ConfigError, match="not an HDF5 file"):
        load_denser(tmp_path / "text.h5")
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f.create_group("conv2d_1")
    with pytest.raises(ConfigError, match="no 'model_config'"):
        load_denser(tmp_path / "weights.h5")
    with pytest.raises(ConfigError, match="needs model.checkpoint"):
        build_model(ModelConfig("denser", device="cpu"), "cifar10", (3, 32, 32), 10)
    inp = keras.Input((8, 8, 3))
    out = layers.Conv2DTranspose(2, 3, name="deconv")(inp)
    save_h5(keras.Model(inp, out), tmp_path / "deconv.h5")
    with pytest.raises(
        ConfigError, match="Conv2DTranspose is not supported; supported: InputLayer, Conv2D"
    ):
        load_denser(tmp_path / "deconv.h5", mean="none")
