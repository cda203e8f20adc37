"""Pictures of a trained model: what adaptation did to the features, and where the target errors are.

    python visualize.py runs/mcd.pt                                  # t-SNE + confusion matrix
    python visualize.py runs/mcd.pt --compare runs/source_only.pt    # the same, beside the baseline

Writes OUT_tsne.png (G's features of source and target test images, embedded with scikit-learn's t-SNE,
coloured by dataset and by class: with MCD the target clusters should sit on the source's) and
OUT_confusion.png (target test set, ensemble of F1 and F2), OUT being --out (default: the checkpoint's
STEM_visualize, beside it; never a run's own files). Data come from the checkpoint's --data-root unless
--data-root is given. torch is imported after the flags are read.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli import HelpFormatter, OneLineErrors
from config import positive_int
from figures import dataset_label, pyplot, run_title, save_figure

if TYPE_CHECKING:
    import numpy as np

    from algorithms import SourceOnly
    from datasets import Digits, DigitsSplit

DOMAIN_COLOURS = {"source": "tab:blue", "target": "tab:red"}
FEW = 10  # up to this many classes: one colour each, with a legend; more (43 signs) on a colour scale
FEW_COLOURS = "tab10"  # class k is drawn in colour k (vmin 0, vmax classes - 1 below)


def _subset(split: DigitsSplit, count: int, seed: int) -> DigitsSplit:
    """`count` images drawn without replacement (all when the split is smaller), the same for every model."""
    import torch

    from datasets import DigitsSplit

    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:count].to(split.labels.device)
    return DigitsSplit(split.images[index], split.labels[index])


def tsne_points(model: SourceOnly, source: DigitsSplit, target: DigitsSplit, seed: int) -> np.ndarray:
    """2-D t-SNE of G's eval-mode features of the source images followed by the target images."""
    import torch
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = torch.cat([f.float() for split in (source, target) for f, _, _ in model.eval_passes(split.images, 2048)])
    features = features.cpu().numpy()
    reduced = PCA(n_components=min(50, *features.shape), random_state=seed).fit_transform(features)  # t-SNE's usual first step
    return TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(features) - 1) / 3), random_state=seed).fit_transform(reduced)


def save_tsne(models: list[tuple[str, SourceOnly]], data: Digits, names: tuple[str, str], out: Path, images: int,
              seed: int = 0) -> None:
    """One row per model: features coloured by dataset (left; `names`: the source's and the target's) and by
    class, target as crosses (right)."""
    import numpy as np
    import torch
    from matplotlib.lines import Line2D

    plt = pyplot()
    source, target = _subset(data.source_test, images, seed), _subset(data.target_test, images, seed + 1)
    domains = np.array(["source"] * len(source) + ["target"] * len(target))
    classes = torch.cat([source.labels, target.labels]).cpu().numpy()
    figure, axes = plt.subplots(len(models), 2, figsize=(11, 5 * len(models)), squeeze=False)
    for row, (name, model) in enumerate(models):
        points = tsne_points(model, source, target, seed)
        by_domain, by_class = axes[row]
        for domain, colour in DOMAIN_COLOURS.items():
            chosen = domains == domain
            dataset = names[domain == "target"]
            by_domain.scatter(*points[chosen].T, s=4, c=colour, alpha=0.5,
                              label=f"{dataset} ({domain}, {chosen.sum():,} test images)")
        by_domain.legend(markerscale=3)
        by_domain.set_title(f"{name}\nby dataset", fontsize="medium")
        few = model.classes <= FEW
        colours = plt.get_cmap(FEW_COLOURS if few else "nipy_spectral")
        for domain, marker in (("source", "o"), ("target", "x")):
            chosen = domains == domain
            drawn = by_class.scatter(*points[chosen].T, s=5, c=classes[chosen], cmap=colours, vmin=0,
                                     vmax=model.classes - 1, marker=marker, alpha=0.6, linewidths=0.6)
        if few:
            legend = [Line2D([], [], marker="o", linestyle="", color=colours(k), label=label)
                      for k, label in enumerate(data.classes)]
            by_class.legend(handles=legend, title="class", fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
        else:
            figure.colorbar(drawn, ax=by_class, label="class")
        by_class.set_title(f"{name}\nby class (o {names[0]}, x {names[1]})", fontsize="medium")
        for axes_ in (by_domain, by_class):
            axes_.set_xticks([])
            axes_.set_yticks([])
    figure.tight_layout()
    save_figure(figure, out, dpi=110)


def build_parser() -> OneLineErrors:
    parser = OneLineErrors(prog="visualize.py", description=__doc__.split("\n")[0], formatter_class=HelpFormatter,
                           allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path, help="a .pt written by main.py")
    parser.add_argument("--compare", type=Path, default=None, help="a second checkpoint (e.g. source-only) for the t-SNE")
    parser.add_argument("--images", type=positive_int, default=1000, help="test images per dataset in the t-SNE")
    parser.add_argument("--data-root", default=None, help="default: the checkpoint's")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when there is one")
    parser.add_argument("--out", type=Path, default=None,
                        help="the pictures' path without _tsne.png / _confusion.png (default: STEM_visualize beside "
                             "the checkpoint); never a run's own files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or args.checkpoint.with_name(f"{args.checkpoint.stem}_visualize")
    if any(out.with_suffix(suffix).exists() for suffix in (".pt", ".csv", ".json")):
        parser.error(f"--out {out}: that is a run's name, and its _confusion.png is the run's own; choose another --out")
    # The model code (torch and all) only now: --help and a bad flag are answered without it.
    import torch

    from checkpoint import ResumeError, checkpoint_data, load_checkpoint, model_from_checkpoint
    from config import SettingError, resolve_device
    from datasets import DataError
    from locks import refuse_if_training
    from results import OutputError
    from run_control import save_target_confusion

    try:
        device = torch.device(resolve_device(args.device))
    except SettingError as error:
        parser.error(str(error))
    pictures = [out.with_name(f"{out.name}_{kind}.png") for kind in ("tsne", "confusion")]
    try:
        for path in filter(None, (args.checkpoint, args.compare)):
            refuse_if_training(path, "visualize")
        checkpoints = [(path, load_checkpoint(path, flag="visualize")) for path in filter(None, (args.checkpoint, args.compare))]
        pairs = {path: (c["config"].get("source", "svhn"), c["config"].get("target", "mnist")) for path, c in checkpoints}
        if len(set(pairs.values())) > 1:
            raise DataError("--compare: the two checkpoints were trained on different pairs ("
                            + "; ".join(f"{path}: {source} -> {target}" for path, (source, target) in pairs.items())
                            + "); compare models of one pair")
        first = checkpoints[0][1]
        data = checkpoint_data(first, device, args.data_root)
        models = [(f"{path.stem} ({run_title(c['config'])}, epoch {c['epoch']})", model_from_checkpoint(c, device, path))
                  for path, c in checkpoints]
        save_target_confusion(models[0][1], data, pictures[1], first["config"], first["epoch"], chunk_size=2048)
        save_tsne(models, data, tuple(dataset_label(name) for name in pairs[args.checkpoint]), pictures[0], args.images)
    except (DataError, OutputError, ResumeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {pictures[0]} and {pictures[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
