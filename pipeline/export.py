"""Export a finished run for TensorBoard's embedding projector (hover, search, thumbnails).

Per attack x norm and layer, two tensors: the PCA-reduced points the t-SNE started from
(the projector can run its own PCA, t-SNE or UMAP on them) and advlens' 2-D map. Every point
is one image, clean or perturbed (clean rows first, then their twins in the same order);
a metadata table gives for each: clean/perturbed, true label, predicted label, attack
success, perturbation norm, sample index and whether it overlaps. A sprite of the images
(clean and perturbed, from the stored ``input`` layer) shows thumbnails. Then:
``tensorboard --logdir DIR`` and open the Projector tab.

Examples:
  advlens export runs/default --projector runs/default/projector
  advlens export runs/default --projector /tmp/proj --layer fc1 --norm linf
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from advlens._io import atomic_write
from advlens.errors import ConfigError, closest
from advlens.reduce import reduce_store
from advlens.report.tables import load_maps, read_metrics
from advlens.store import ActivationStore

log = logging.getLogger(__name__)
SPRITE_MAX = 8192  # TensorBoard's largest sprite side in pixels
META_COLUMNS = ("point", "label", "prediction", "success", "norm", "index", "overlapping")


def export_projector(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: list[str] | None = None,
    norm: str | None = None,
    attack: str | None = None,
) -> Path:
    """Write ``projector_config.pbtxt`` and its tensors, metadata and sprites into ``out_dir``.

    Returns the config's path. ``layers`` None: every layer with a map.
    """

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    rows, order = read_metrics(run_dir)
    prov_path = run_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    classes = (prov.get("dataset") or {}).get("classes")
    pca_dims = int(((prov.get("config") or {}).get("embed") or {}).get("pca_dims", 50))
    shapes = {d["name"]: tuple(d["shape"]) for d in prov.get("layers", [])}
    maps = load_maps(run_dir, rows)
    keys = [k for k in maps if attack in (None, k[0]) and norm in (None, k[1])]
    if not keys:
        have = ", ".join(f"{a} {n}" for a, n in maps) or "none"
        raise ConfigError(f"no maps for attack={attack!r} norm={norm!r} in {run_dir} ({have})")
    for name in layers or []:
        if name not in order:
            raise ConfigError(
                f"--layer {name!r} is not a layer of {run_dir}; {closest(name, order)}"
            )
    embeddings = []
    for key in keys:
        group = f"{key[0]}-{key[1]}"
        store_path = run_dir / f"{group}.zarr"
        if not store_path.is_dir():
            raise ConfigError(f"{store_path} is missing: the projector export needs the store")
        store = ActivationStore.open(store_path)
        samples = store.samples()
        (out_dir / group).mkdir(parents=True, exist_ok=True)
        sel = [m for m in maps[key] if not layers or m.row["layer"] in layers]
        sprite = None
        if "input" in store.layers and "input" in shapes:
            sprite = _write_sprite(out_dir / group / "sprite.png", store, shapes["input"])
        for m in sel:
            layer = m.row["layer"]
            stem = f"{group}/{_safe(layer)}"
            seed = int(m.row.get("seed") or 0)
            meta = f"{stem}-metadata.tsv"  # per layer: which points overlap differs by layer
            _write_metadata(out_dir / meta, samples, classes, m.per_point)
            # The task's own PCA: streamed from the store, as advlens.layer_task does.
            pts = reduce_store(store, layer, pca_dims, seed=seed, device="cpu").scores
            for suffix, arr, what in ((".bytes", pts, f"PCA {pts.shape[1]}"),
                                      ("-tsne.bytes", m.xy, "t-SNE map")):  # fmt: skip
                arr = np.ascontiguousarray(arr, dtype="<f4")
                atomic_write(out_dir / f"{stem}{suffix}", arr.tobytes())
                embeddings.append({
                    "tensor_name": f"{key[0]} {key[1]} {layer} ({what})",
                    "tensor_path": f"{stem}{suffix}", "tensor_shape": list(arr.shape),
                    "metadata_path": meta, "sprite": sprite,
                })  # fmt: skip
    path = out_dir / "projector_config.pbtxt"
    atomic_write(path, _pbtxt(embeddings).encode())
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _write_metadata(path: Path, samples: dict, classes, per_point) -> None:
    n = len(samples["label"])
    names = list(classes) if classes else None

    def cls(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    lines = ["\t".join(META_COLUMNS)]
    for twin, pred in ((False, samples["pred_clean"]), (True, samples["pred_perturbed"])):
        for i in range(n):
            lap = "" if per_point is None else f"{bool(per_point[i + n * twin] > 0.5)}"
            lines.append("\t".join([
                "perturbed" if twin else "clean", cls(int(samples["label"][i])),
                cls(int(pred[i])), str(bool(samples["success"][i])),
                f"{float(samples['norm'][i]) if twin else 0.0:.4g}", str(int(samples["index"][i])),
                lap,
            ]))  # fmt: skip
    atomic_write(path, ("\n".join(lines) + "\n").encode())


def _write_sprite(path: Path, store, shape: tuple[int, ...]) -> dict[str, Any] | None:
    """One thumbnail per point (clean images, then perturbed) in a square grid."""

    if len(shape) != 3 or shape[0] not in (1, 3):
        return None
    c, h, w = shape
    imgs = store.joint("input").reshape(-1, c, h, w).astype(np.float32)
    side = math.ceil(math.sqrt(len(imgs)))
    scale = min(1.0, SPRITE_MAX / (side * max(h, w)))
    th, tw = max(1, int(h * scale)), max(1, int(w * scale))
    sheet = Image.new("RGB", (side * tw, side * th), "white")
    for i, img in enumerate(imgs):
        a = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        tile = Image.fromarray(a[..., 0] if c == 1 else a).convert("RGB")
        if (th, tw) != (h, w):
            tile = tile.resize((tw, th))
        sheet.paste(tile, ((i % side) * tw, (i // side) * th))
    atomic_write(path, lambda p: sheet.save(p, format="PNG"))
    return {"image_path": f"{path.parent.name}/{path.name}", "single_image_dim": [tw, th]}


def _pbtxt(embeddings: list[dict]) -> str:
    """The projector config in protobuf text format (the format TensorBoard reads)."""
    out = []
    for e in embeddings:
        lines = [f"  tensor_name: {json.dumps(e['tensor_name'])}",
                 f"  tensor_path: {json.dumps(e['tensor_path'])}",
                 f"  metadata_path: {json.dumps(e['metadata_path'])}"]  # fmt: skip
        lines += [f"  tensor_shape: {d}" for d in e["tensor_shape"]]
        if e.get("sprite"):
            s = e["sprite"]
            lines += ["  sprite {", f"    image_path: {json.dumps(s['image_path'])}"]
            lines += [f"    single_image_dim: {d}" for d in s["single_image_dim"]] + ["  }"]
        out.append("embeddings {\n" + "\n".join(lines) + "\n}")
    return "\n".join(out) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a finished run folder, e.g. runs/default")
    parser.add_argument(
        "--projector", required=True, metavar="DIR", help="folder for TensorBoard's projector"
    )
    parser.add_argument(
        "--layer", action="append", default=None, help="only this layer (repeatable)"
    )
    parser.add_argument("--norm", default=None, help="only this norm (default: every norm)")
    parser.add_argument("--attack", default=None, help="only this attack (default: every attack)")


def main(args: argparse.Namespace) -> int:
    norm = args.norm.lower() if args.norm else None
    path = export_projector(
        args.run_dir, args.projector, layers=args.layer, norm=norm, attack=args.attack
    )
    print(f"projector: {path}\nview it with: tensorboard --logdir {Path(args.projector)}")
    return 0
