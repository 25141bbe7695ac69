"""`tumorflow phantom` and `tumorflow validate`: make the synthetic dataset; download, check and split."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run_phantom(args: argparse.Namespace) -> int:
    from tumorflow.components.data.phantom import generate_phantom, images_folder

    root = generate_phantom(
        Path(args.output),
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        slices_per_patient=args.slices_per_patient,
        corrupt=args.corrupt,
    )
    print(
        f"wrote {4 * args.per_class} images ({args.per_class} per class, {args.size} px) under {images_folder(root)}"
    )
    if args.corrupt:
        print(f"plus {args.corrupt} broken files for the quarantine demo")
    return 0


def _run_validate(args: argparse.Namespace) -> int:
    from tumorflow.components.data.download import download_dataset
    from tumorflow.components.data.validate import QUARANTINE_CSV, validate_and_split
    from tumorflow.core.config import load_config

    overrides = list(args.set or [])
    config = load_config(args.config, args.preset, overrides)
    source = args.source or config.dataset.source
    output = Path(args.output)
    raw = download_dataset(source, output / "raw", config.dataset)
    result = validate_and_split(
        output / "raw", output / "split", config.split, config.dataset.classes or None
    )

    print(f"raw dataset:   {output / 'raw'} ({len(raw.rows)} images from {source})")
    print(f"split dataset: {output / 'split'}")
    print(result.report_markdown(max_quarantine_rows=10))
    print(f"quarantine report: {output / 'split' / QUARANTINE_CSV}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    phantom = subparsers.add_parser(
        "phantom",
        help="write the synthetic CT-like kidney dataset (Kaggle kidney CT layout)",
        description="Write a deterministic synthetic CT-like dataset laid out like the Kaggle kidney "
        "CT set (4 classes: cyst, normal, stone, tumor). The same seed gives byte-identical files.",
    )
    phantom.add_argument("--output", required=True, help="folder to write the dataset into")
    phantom.add_argument(
        "--per-class", type=int, default=100, help="images per class (default 100)"
    )
    phantom.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument(
        "--slices-per-patient",
        type=int,
        default=4,
        help="consecutive near-duplicate slices per synthetic patient (default 4)",
    )
    phantom.add_argument(
        "--corrupt", type=int, default=0, help="add N broken files (for quarantine demos)"
    )
    phantom.set_defaults(handler=_run_phantom)

    validate = subparsers.add_parser(
        "validate",
        help="download a dataset, quarantine bad images, write a leakage-aware split",
        description="Download SOURCE, validate every image and write the split dataset. "
        "Writes DIR/raw/ (files/, manifest.csv, source.json) and DIR/split/ (TFRecord shards, "
        "split_manifest.json/.csv, quarantine.csv).",
    )
    validate.add_argument(
        "source",
        nargs="?",
        help="phantom | a folder | a .zip/.tar/.tar.gz/.tgz | kaggle:<owner>/<slug>[/versions/N] | "
        "gs://bucket/prefix (default: dataset.source of the config)",
    )
    validate.add_argument(
        "--output", required=True, metavar="DIR", help="writes DIR/raw/ and DIR/split/"
    )
    validate.add_argument(
        "--preset", help="dataset preset: phantom, kidney_ct, chest_ct, brain_mri"
    )
    validate.add_argument("--config", help="YAML config file (applied after the preset)")
    validate.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set split.test_fraction=0.2 (repeatable)",
    )
    validate.set_defaults(handler=_run_validate)
