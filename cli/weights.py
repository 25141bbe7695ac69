"""`tumorflow weights import|list`: ImageNet backbone weights on a machine without internet.

`import` checks a Keras application's "notop" weights file copied from another machine and puts
it into the Keras cache, where `train.weights: imagenet` finds it without a download; `list`
shows which file each backbone and image size needs and what the cache holds (docs/weights.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from tumorflow.components.training.backbones import PRETRAINED_BACKBONES


def _import(args: argparse.Namespace) -> int:
    from tumorflow.components.training.weights import import_weights

    imported = import_weights(Path(args.file), args.backbone, args.image_size)
    if args.json:
        print(json.dumps(asdict(imported)))
        return 0
    print(f"imported {args.file} as {imported.path}")
    print(f"sha256   {imported.sha256}")
    print(
        f"check    {imported.check}" + (f" ({imported.keras_hash})" if imported.keras_hash else "")
    )
    print(f"train.backbone={args.backbone} train.weights=imagenet now loads it without a download")
    return 0


def _list(args: argparse.Namespace) -> int:
    from tumorflow.components.training.backbones import keras_weights_cache
    from tumorflow.components.training.weights import needed_weights

    rows = needed_weights()
    if args.json:
        print(json.dumps({"cache": str(keras_weights_cache()), "files": [asdict(r) for r in rows]}))
        return 0
    print(f"Keras cache: {keras_weights_cache()}")
    header = ("backbone", "image size", "cached", "file", "Keras hash")
    table = [
        (
            r.backbone,
            r.image_sizes,
            "yes" if r.cached else "no",
            r.file_name,
            r.keras_hash or "none",
        )
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in (header, *table)) for i in range(len(header))]
    for row in (header, *table):
        print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )
    for r in rows:
        if r.cached:
            print(f"{r.file_name}: sha256 {r.sha256}, {r.check}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    weights = subparsers.add_parser(
        "weights",
        help="ImageNet backbone weights offline: import a file into the Keras cache, list needs",
        description="Pretrained backbone weights for machines without internet (docs/weights.md).",
    )
    commands = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)

    import_ = commands.add_parser(
        "import",
        help="check a Keras application's ImageNet notop weights file and put it into the cache",
        description="Check FILE (HDF5, the hash Keras publishes for it where there is one, layers "
        "that fit the backbone) and copy it into the Keras cache under the name "
        "keras.applications loads, recording its SHA-256.",
    )
    import_.add_argument("file", metavar="FILE", help="the .h5 weights file")
    import_.add_argument("--backbone", required=True, choices=PRETRAINED_BACKBONES)
    import_.add_argument(
        "--image-size",
        type=int,
        default=224,
        help="the train.image_size it is for; only MobileNetV2's file depends on it (default 224)",
    )
    import_.add_argument("--json", action="store_true", help="print the import record as JSON")
    import_.set_defaults(handler=_import)

    list_ = commands.add_parser(
        "list", help="which weights file each backbone and image size needs, and what is cached"
    )
    list_.add_argument("--json", action="store_true", help="print JSON")
    list_.set_defaults(handler=_list)
