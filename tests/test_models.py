"""Model zoo, layer taps and checkpoints: small-cnn, WRN (vs RobustBench's reference), user models."""

from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advlens.config import ModelConfig
from advlens.errors import ConfigError
from advlens.models import MODELS, ModelRequest, build_model, list_models, read_state_dict, register
from advlens.models.small_cnn import SmallCNN
from advlens.models.taps import INPUT, LayerInfo, catalog, select_layers, tap_forward

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# --------------------------------------------------------------------------- reference WRN
# RobustBench's WideResNet (robustbench/model_zoo/architectures/wide_resnet.py), the
# architecture of its CIFAR-10 "Standard" checkpoint, written out here as the oracle.


class RefBasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, dropRate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(
            in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False
        )
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            (not self.equalInOut)
            and nn.Conv2d(
                in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False
            )
            or None
        )

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class RefNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, block, stride, dropRate=0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(
                    i == 0 and in_planes or out_planes, out_planes, i == 0 and stride or 1, dropRate
                )
                for i in range(int(nb_layers))
            ]
        )

    def forward(self, x):
        return self.layer(x)


class RefWideResNet(nn.Module):
    def __init__(self, depth=28, num_classes=10, widen_factor=10, sub_block1=False, dropRate=0.0):
        super().__init__()
        nChannels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        assert (depth - 4) % 6 == 0
        n = (depth - 4) / 6
        block = RefBasicBlock
        self.conv1 = nn.Conv2d(3, nChannels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = RefNetworkBlock(n, nChannels[0], nChannels[1], block, 1, dropRate)
        if sub_block1:
            self.sub_block1 = RefNetworkBlock(n, nChannels[0], nChannels[1], block, 1, dropRate)
        self.block2 = RefNetworkBlock(n, nChannels[1], nChannels[2], block, 2, dropRate)
        self.block3 = RefNetworkBlock(n, nChannels[2], nChannels[3], block, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(nChannels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(nChannels[3], num_classes)
        self.nChannels = nChannels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        return self.fc(out)


def random_reference(depth, width, seed=0, sub_block1=False):
    """A reference WRN with random weights and non-trivial batch-norm statistics."""
    torch.manual_seed(seed)
    ref = RefWideResNet(depth=depth, widen_factor=width, sub_block1=sub_block1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.Linear):
                m.bias.uniform_(-0.1, 0.1)
    return ref.eval()


@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_wrn_loads_reference_state_dict_exactly(tmp_path, prefix):
    ref = random_reference(16, 2, seed=1, sub_block1=prefix == "model.")
    path = tmp_path / "wrn.pt"
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)
    model = build_model(
        ModelConfig("wrn-16-2", checkpoint=str(path), device="cpu"), "cifar10", (3, 32, 32), 10
    )
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_cifar10_wrn28_10_config_model_side(tmp_path):
    """configs/cifar10-wrn28-10.toml on a tiny CIFAR-10 binary folder and a random reference checkpoint."""
    import numpy as np

    from advlens.config import load
    from advlens.data import load_dataset

    rng = np.random.default_rng(0)
    records = np.concatenate([rng.integers(0, 10, (3, 1)), rng.integers(0, 256, (3, 3072))], axis=1)
    records.astype(np.uint8).tofile(tmp_path / "test_batch.bin")
    ref = random_reference(28, 10, seed=2)
    ckpt = tmp_path / "standard.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, ckpt)
    cfg = load(
        CONFIGS / "cifar10-wrn28-10.toml",
        [f"data.path={tmp_path}", f"model.checkpoint={ckpt}", "model.device=cpu"],
    )
    ds = load_dataset(cfg.data.source, cfg.data.split, cfg.data.path)
    model = build_model(cfg.model, ds.name, ds.shape, len(ds.classes))
    assert sum(p.numel() for p in model.parameters()) == 36_479_194  # RobustBench's Standard
    x = torch.from_numpy(ds.images[:2])
    with torch.no_grad():
        expected = ref(x)
    layers = select_layers(catalog(model, ds.shape), cfg.layers.select, cfg.layers.include_input)
    assert layers == ["input", "conv1", "block1", "block2", "block3", "relu", "fc"]
    logits, acts = tap_forward(model, x, layers)
    assert torch.equal(logits, expected) and torch.equal(acts["fc"], expected)
    assert acts["block1"].shape == (2, 163_840) and acts["relu"].shape == (2, 40_960)
    assert (acts["relu"] >= 0).all() and torch.equal(acts["input"], x.reshape(2, -1))


def test_denser_config_loads():
    from advlens.config import load

    cfg = load(CONFIGS / "denser.toml")
    assert cfg.model.name == "denser" and cfg.data.source == "cifar10" and cfg.model.checkpoint
    assert cfg.attack.eps_for("linf", cfg.data.source) == pytest.approx(8 / 255)


def test_wrn_catalog_and_auto():
    from advlens.models.wrn import WideResNet

    infos = catalog(WideResNet(16, 2), (3, 32, 32))  # 28-10's listing: test_layers_cli
    names = [i.name for i in infos]
    assert names[:3] == ["input", "conv1", "block1.layer.0"]
    assert len(names) == 1 + 1 + 3 * 3 + 2 and names[-2:] == ["relu", "fc"]
    shapes = {i.name: i.shape for i in infos}
    assert shapes["block1"] == (32, 32, 32) and shapes["block2.layer.0"] == (64, 16, 16)
    assert shapes["block3"] == (128, 8, 8) and shapes["fc"] == (10,)
    assert select_layers(infos, ["auto"], include_input=False) == [
        "conv1",
        "block1",
        "block2",
        "block3",
        "relu",
        "fc",
    ]
    assert select_layers(infos, ["block2.layer.*"], include_input=False) == [
        f"block2.layer.{i}" for i in range(2)
    ]


def test_wrn_needs_checkpoint():
    with pytest.raises(ConfigError, match="needs model.checkpoint"):
        build_model(ModelConfig("wrn-28-10", device="cpu"), "cifar10", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="depth 20"):
        build_model(
            ModelConfig("wrn-20-1", device="cpu"), "cifar10", (3, 32, 32), 10, weights=False
        )


def test_taps_clone_before_inplace_relu():
    """bn1 of an equal-width block is followed by ReLU(inplace=True): a bare hook would see ReLU'd values."""
    ref = random_reference(
        10, 1, seed=3
    )  # 10 = one block per group; block1.layer.0 is equalInOut (16->16)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, acts = tap_forward(ref, x, ["conv1", "block1.layer.0.bn1", "block1.layer.0.relu1"])
    with torch.no_grad():
        expected_bn = ref.block1.layer[0].bn1(ref.conv1(x)).reshape(2, -1)
    assert torch.allclose(acts["block1.layer.0.bn1"], expected_bn)
    assert (acts["block1.layer.0.bn1"] < 0).any()
    assert torch.equal(acts["block1.layer.0.relu1"], expected_bn.clamp_min(0))


# --------------------------------------------------------------------------- small-cnn and taps


def test_small_cnn_catalog_shapes():
    model = SmallCNN((1, 28, 28), 10)
    infos = catalog(model, (1, 28, 28))
    assert [i.name for i in infos] == [INPUT, "conv1", "pool1", "conv2", "pool2", "fc1", "logits"]
    assert [i.shape for i in infos] == [
        (1, 28, 28),
        (16, 28, 28),
        (16, 14, 14),
        (32, 14, 14),
        (32, 7, 7),
        (128,),
        (10,),
    ]
    assert (
        infos[1].dim("gap") == 16 and infos[1].dim() == 16 * 28 * 28 and infos[0].dim("gap") == 784
    )
    assert model.training  # catalog restores the mode
    rgb = catalog(SmallCNN((3, 32, 32), 7), (3, 32, 32))
    assert rgb[-1].shape == (7,) and rgb[4].shape == (32, 8, 8)


def test_select_layers_patterns():
    infos = catalog(SmallCNN(), (1, 28, 28))
    assert select_layers(infos, ["all"]) == [i.name for i in infos]
    assert select_layers(infos, ["pool*", "logits"]) == [INPUT, "pool1", "pool2", "logits"]
    assert select_layers(infos, ["logits", "conv1"], include_input=False) == ["conv1", "logits"]
    assert select_layers(infos, ["input"], include_input=False) == [INPUT]
    with pytest.raises(ConfigError, match=r"'fc2' matches no layer.*fc1"):
        select_layers(infos, ["fc2"])


def test_tap_forward_matches_manual_forward():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.rand(5, 1, 28, 28)
    logits, acts = tap_forward(model, x, [INPUT, "conv1", "pool2", "fc1", "logits"])
    with torch.no_grad():
        c1 = model.conv1(x)
        p2 = model.pool2(model.conv2(model.pool1(c1)))
        f1 = model.fc1(p2)
        assert torch.equal(logits, model(x))
    assert list(acts) == [INPUT, "conv1", "pool2", "fc1", "logits"]
    assert torch.equal(acts[INPUT], x.reshape(5, -1))
    assert torch.equal(acts["conv1"], c1.reshape(5, -1))
    assert torch.equal(acts["pool2"], p2.reshape(5, -1))
    assert torch.equal(acts["fc1"], f1) and torch.equal(acts["logits"], logits)
    _, pooled = tap_forward(model, x, [INPUT, "conv1", "fc1"], pool="gap")
    assert torch.allclose(pooled["conv1"], c1.mean(dim=(2, 3)))
    assert pooled[INPUT].shape == (5, 784) and pooled["fc1"].shape == (5, 128)
    with pytest.raises(ConfigError, match="layers.pool"):
        tap_forward(model, x, ["conv1"], pool="max")
    with pytest.raises(ConfigError, match="closest"):
        tap_forward(model, x, ["conv3"])


def test_generic_model_catalog_reused_module():
    """Without declared taps: leaf modules (no dropout/flatten); a reused module keeps its last call."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.act = nn.ReLU()
            self.drop = nn.Dropout(0.5)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.act(self.b(self.drop(self.act(self.a(x)))))

    infos = catalog(Net(), (4,))
    assert [(i.name, i.shape) for i in infos] == [
        (INPUT, (4,)),
        ("a", (6,)),
        ("b", (3,)),
        ("act", (3,)),
    ]
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))
    infos = catalog(seq, (1, 28, 28))
    assert [i.name for i in infos] == [INPUT, "0", "1", "3"] and all(i.auto for i in infos[1:])


def test_layerinfo_is_frozen():
    info = LayerInfo("x", (2, 3))
    with pytest.raises(AttributeError):
        info.name = "y"
    assert info.size == 6


# --------------------------------------------------------------------------- checkpoints, registry, user models


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    model = SmallCNN()
    path = tmp_path / "evil.pt"
    marker = tmp_path / "ran"
    state = dict(model.state_dict())
    state["payload"] = _Payload(
        str(marker)
    )  # torch.save pickles the object: code runs on a plain load
    torch.save(state, path)
    with pytest.raises(ConfigError, match="refuses to load") as exc:
        build_model(
            ModelConfig("small-cnn", checkpoint=str(path), device="cpu"),
            "fashion-mnist",
            (1, 28, 28),
            10,
        )
    assert "weights_only=True" in str(exc.value) and "state_dict()" in str(exc.value)
    assert "not a weights-only file" in str(exc.value) and "open)" in str(exc.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what a plain torch.load would let through
        torch.load(path, weights_only=True)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_mismatch_names_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(ConfigError, match=r"missing \d+ keys \(conv1.0.weight"):
        build_model(
            ModelConfig("small-cnn", checkpoint=str(path), device="cpu"),
            "fashion-mnist",
            (1, 28, 28),
            10,
        )
    with pytest.raises(ConfigError, match="file not found"):
        read_state_dict(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a torch checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1), "b": [1, 2]}, tmp_path / "mixed.pt")
    with pytest.raises(ConfigError, match="not a state dict"):
        read_state_dict(tmp_path / "mixed.pt")


def test_small_cnn_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(4)
    src = SmallCNN().eval()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model(
        ModelConfig("small-cnn", checkpoint=str(tmp_path / "w.pt"), device="cpu"),
        "fashion-mnist",
        (1, 28, 28),
        10,
    )
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_registry_and_unknown_names():
    assert {"small-cnn", "wrn-28-10", "denser"} <= set(list_models())
    with pytest.raises(ConfigError, match="closest valid names.*wrn-28-10"):
        build_model(ModelConfig("wrn-28-1O", device="cpu"), "cifar10", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="cannot import"):
        build_model(ModelConfig("no_such_pkg.nets:make", device="cpu"), "cifar10", (3, 32, 32), 10)
    with pytest.raises(ConfigError, match="no trained weights for dataset 'cifar10'"):
        build_model(ModelConfig("small-cnn", device="cpu"), "cifar10", (3, 32, 32), 10)


def test_registered_builder_gets_one_request(monkeypatch):
    """A builder registered with ``@register`` is called with one ModelRequest that carries
    what build_model was given, and build_model freezes and evaluates what it returns."""
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))  # leave the registry as it was
    seen = []

    @register("test-linear")
    def build(request: ModelRequest) -> nn.Module:
        seen.append(request)
        c, h, w = request.in_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, request.n_classes))

    cfg = ModelConfig("test-linear", device="cpu")
    model = build_model(cfg, "folder", [3, 2, 2], 4, weights=False)
    assert seen == [ModelRequest(cfg, "folder", (3, 2, 2), 4, False)]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(1, 3, 2, 2)).shape == (1, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        seen[0].weights = True  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ModelRequest(cfg, "folder", (3, 2), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_model(cfg, "folder", (1, 3, 2, 2), 4, weights=False)


def test_user_factory_with_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def tiny(num_classes=10):
                return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))

            def not_a_model():
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(5)
    src = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    torch.save(
        {"model": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "t.pt"
    )
    cfg = ModelConfig("mynets:tiny", checkpoint=str(tmp_path / "t.pt"), device="cpu")
    model = build_model(cfg, "folder", (3, 2, 2), 4)
    x = torch.rand(2, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert [i.name for i in catalog(model, (3, 2, 2))] == [INPUT, "1"]
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_model(ModelConfig("mynets:not_a_model", device="cpu"), "folder", (3, 2, 2), 4)
    with pytest.raises(ConfigError, match="no callable 'nope'"):
        build_model(ModelConfig("mynets:nope", device="cpu"), "folder", (3, 2, 2), 4)


def test_torchvision_name_needs_package_or_builds():
    from advlens._optional import MissingDependency, has

    cfg = ModelConfig("torchvision:resnet18", device="cpu")
    if not has("torchvision"):
        with pytest.raises(MissingDependency, match="pip install torchvision"):
            build_model(cfg, "cifar10", (3, 32, 32), 10)
    else:
        model = build_model(cfg, "cifar10", (3, 32, 32), 10)
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)


# --------------------------------------------------------------------------- advlens layers


def run_layers(argv, capsys):
    from advlens.models import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.__doc__ and "Examples:" in cli.__doc__
    assert cli.main(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_layers_cli(capsys):
    out = run_layers(["--model", "small-cnn"], capsys)  # lists shapes without training anything
    assert "conv1" in out and "(16, 28, 28)" in out and "logits" in out
    out = run_layers(["--model", "wrn-28-10"], capsys)
    lines = [line.split() for line in out.splitlines()[2:]]
    assert len(lines) == 19
    assert ["*", "block1", "(160,", "32,", "32)", "163840"] in [x[:6] for x in lines]
    assert ["163840", "=", "block1.layer.3"] == lines[6][5:8] and lines[6][1] == "block1"
    assert any(line[:2] == ["block3.layer.2", "(640,"] for line in lines)
    out = run_layers(["--model", "wrn-16-2", "--select", "auto", "--pool", "gap"], capsys)
    assert "block2.layer.0" not in out and out.split("block2")[1].split("\n")[0].split()[-1] == "64"
