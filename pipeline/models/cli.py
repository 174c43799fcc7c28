"""List a model's tappable layers with their per-sample output shapes.

Layers marked * are the main stage outputs that ``layers.select = ["auto"]`` picks;
``all`` picks every listed layer. Names and globs from this list go into ``layers.select``.
A layer shown as ``= other`` returns the very tensor ``other`` does (WRN's ``block1`` is
``block1.layer.3``): selected together, it is stored and analysed once.
No weights are loaded (a small-cnn is not trained just to list its layers); ``denser``
needs ``--checkpoint``, the HDF5 file that holds its architecture.

Examples:
  advlens layers --model small-cnn
  advlens layers --model wrn-28-10                      # CIFAR-10 input (3, 32, 32)
  advlens layers --model denser --checkpoint net_1/train_0.hdf5
  advlens layers --model wrn-28-10 --select 'block2.layer.*' --pool gap
  advlens layers --model mypkg.nets:resnet --checkpoint weights.pt --dataset cifar10
"""

from __future__ import annotations

import argparse

from advlens.config import ModelConfig
from advlens.data import dataset_shape
from advlens.models import build_model
from advlens.models.taps import catalog, select_layers

# Models default to the dataset they were made for.
MODEL_DATASET = {"wrn": "cifar10", "denser": "cifar10"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="small-cnn", help="zoo name or package.module:factory")
    parser.add_argument("--checkpoint", default=None, help="state dict (.pt) or DENSER .h5 file")
    parser.add_argument(
        "--dataset",
        default=None,
        help="fashion-mnist, cifar10, synthetic or folder (default: the model's own)",
    )
    parser.add_argument("--data-path", default=None, help="folder of a 'folder' dataset")
    parser.add_argument("--select", nargs="*", default=None, help="show what these patterns pick")
    parser.add_argument(
        "--pool", default="none", choices=("none", "gap"), help="feature size with pooling"
    )


def main(args: argparse.Namespace) -> int:
    dataset = args.dataset or MODEL_DATASET.get(args.model.split("-")[0], "fashion-mnist")
    in_shape, n_classes = dataset_shape(dataset, args.data_path)
    kwargs = {"name": args.model, "checkpoint": args.checkpoint, "device": "cpu"}
    # Shapes need no weights: nothing is trained or loaded (denser reads its architecture).
    # A --checkpoint is loaded, strictly, so that a file that does not fit is named here.
    weights = bool(args.checkpoint)
    model = build_model(ModelConfig(**kwargs), dataset, in_shape, n_classes, weights=weights)
    if weights:
        n_tensors = len(model.state_dict())
        print(f"checkpoint {args.checkpoint}: fits {args.model} ({n_tensors} tensors loaded)")
    infos = catalog(model, in_shape)
    chosen = set(select_layers(infos, args.select, include_input=False)) if args.select else None
    width = max(len(i.name) for i in infos)
    print(f"{args.model} on {dataset} {tuple(in_shape)}: {len(infos)} tappable layers (* = auto)")
    print(f"  {'layer':<{width}}  {'output shape':<16} {'dim':>8}")
    for i in infos:
        if chosen is not None and i.name not in chosen:
            continue
        mark = "*" if i.auto else " "
        shown = i.alias_of and (chosen is None or i.alias_of in chosen)
        alias = f"  = {i.alias_of} (the same tensor, stored once)" if shown else ""
        print(f"{mark} {i.name:<{width}}  {str(i.shape):<16} {i.dim(args.pool):>8}{alias}")
    return 0
