"""Classify your own images with a trained run: `python predict.py RUN.pt PATH [PATH ...] --out predictions.csv`.

Each image file, and every image under a folder (recursively, the formats torchvision's ImageFolder
reads), is brought to the run's input as its target images were (RGB, resized to the network's size,
grey where the network is, scaled to [-1, 1]) and scored on the device in chunks. One CSV row per image:
the file, the class F1, F2 and their ensemble (argmax of the summed logits) predict, by name where the
run recorded its class names, and the ensemble's confidence (the mean of the two heads' softmax for its
class). The flags are read before torch is imported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli import HelpFormatter, OneLineErrors

COLUMNS = ("file", "f1", "f2", "ensemble", "confidence")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="predict.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                           formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run's checkpoint (.pt, written by main.py)")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), help="the CSV of predictions")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                        help="auto: cuda if available, else mps, else cpu")
    parser.add_argument("--chunk-size", type=positive, default=512, help="images read and scored at once")
    return parser


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named, and those under the folders named (sorted); a PATH without images is an error."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from datasets import DataError

    found = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not images:
                raise DataError(f"{path}: no image files in this folder or below it ({', '.join(IMG_EXTENSIONS)})")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found


def predict(checkpoint_path: Path, paths: list[Path], out: Path, device_name: str, chunk_size: int) -> int:
    """Writes `out` (atomically); returns how many images were classified."""
    import numpy as np
    import torch

    from checkpoint import class_names, load_checkpoint, model_from_checkpoint
    from config import resolve_device
    from datasets import to_format
    from dataset_files import rgb_image
    from locks import refuse_if_training
    from models import NETWORKS
    from results import OutputError, write_rows
    from run_control import belongs_to_a_run

    if belongs_to_a_run(out):
        raise OutputError(f"--out {out} is a file of a run of main.py; choose another name")
    refuse_if_training(checkpoint_path, "predict.py")
    checkpoint = load_checkpoint(checkpoint_path, flag="predict.py")
    files = image_files(paths)
    device = torch.device(resolve_device(device_name))
    model, names = model_from_checkpoint(checkpoint, device, checkpoint_path), class_names(checkpoint)
    spec = NETWORKS[model.config.network]
    rows = []
    for start in range(0, len(files), chunk_size):
        chunk = files[start:start + chunk_size]
        pictures = np.stack([rgb_image(path, None, "predict.py", spec.size, fix="replace or remove it") for path in chunk])
        images = to_format(torch.from_numpy(pictures).to(device), spec.channels, spec.size)  # (n, C, size, size) uint8
        for _, logits1, logits2 in model.eval_passes(images, chunk_size):
            p = (logits1.softmax(dim=1) + logits2.softmax(dim=1)) / 2  # (n, classes)
            ensemble = (logits1 + logits2).argmax(dim=1)
            predicted = torch.stack([logits1.argmax(dim=1), logits2.argmax(dim=1), ensemble]).T.tolist()
            confidence = p.gather(1, ensemble[:, None]).squeeze(1).tolist()
            rows += [{"file": str(path), "f1": names[a], "f2": names[b], "ensemble": names[c], "confidence": round(q, 6)}
                     for path, (a, b, c), q in zip(chunk, predicted, confidence)]
    write_rows(out, list(COLUMNS), rows)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from checkpoint import ResumeError  # torch from here on
    from config import SettingError
    from datasets import DataError
    from results import OutputError

    try:
        count = predict(args.checkpoint, args.paths, args.out, args.device, args.chunk_size)
    except (DataError, OutputError, ResumeError, SettingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {count} image{'s' if count != 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
