"""`tumorflow bench validate`: the validate step's decoding and hashing on 1, 2, ... workers.

Runs the step's own `check_images` (open, verify and fully decode each image, SHA-256 against the
manifest, pHash) over the same synthetic CT-like JPEG scans (512 x 512 by default, the size of
most CT exports) once per worker count, taking turns for `--repeats` passes, and prints the
median images/s, how the checks ran (`check_pool`: serial, threads or processes), the cores kept
busy (CPU time of this process and of its worker processes over wall time) and the speed-up
against the first worker count. Every worker count must give the same checks (the command fails
otherwise).
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorflow.components.data import validate
from tumorflow.components.data.manifest import ManifestRow, sha256_file
from tumorflow.components.data.synthetic import SYNTHETIC_CLASSES, draw_synthetic_scan, encode_image

log = logging.getLogger(__name__)


def write_bench_images(
    folder: Path, images: int, size: int, seed: int = 0, distinct: int = 100
) -> list[ManifestRow]:
    """`images` JPEG scans of `size` px in class folders under `folder`, and their manifest rows.

    Drawing a scan costs more than checking it, so `distinct` scans are drawn and the files cycle
    through them: decoding and hashing cost the same whatever the file holds next door.
    """
    rng = np.random.default_rng(seed)
    scans = [
        encode_image(
            draw_synthetic_scan(rng, k % len(SYNTHETIC_CLASSES), len(SYNTHETIC_CLASSES), size),
            "JPEG",
        )
        for k in range(min(images, distinct))
    ]
    rows = []
    for index in range(images):
        label = SYNTHETIC_CLASSES[index % len(scans) % len(SYNTHETIC_CLASSES)]
        relative = f"{label}/{index:06d}.jpg"
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(scans[index % len(scans)])
        rows.append(ManifestRow(relative, label, sha256_file(path), path.stat().st_size, ""))
    return rows


@dataclass(frozen=True)
class Pass:
    """One pass of `check_images`: wall seconds and CPU seconds of this process and its children."""

    wall: float
    cpu: float


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _one_pass(
    files_dir: Path, rows: list[ManifestRow], workers: int
) -> tuple[Pass, list[validate.ImageCheck]]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    checks = validate.check_images(files_dir, rows, workers)
    return Pass(time.perf_counter() - wall, _cpu_seconds() - cpu), checks


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts are whole numbers from 1, like 1,2")
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=2000, help="synthetic images (default 2000)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    parser.add_argument(
        "--workers",
        type=_worker_counts,
        default=[1, 2],
        metavar="N,N",
        help="worker counts to compare, the first one the baseline (default 1,2)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="passes per worker count; the median (default 3)"
    )
    parser.add_argument("--workdir", type=Path, help="where to write the images (default: temp)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Check the same images with each worker count, print the table with speed-ups."""
    with tempfile.TemporaryDirectory(prefix="tumorflow-bench-") as tmp:
        files_dir = Path(args.workdir or tmp)
        log.info("writing %d synthetic %dpx JPEG scans to %s", args.images, args.size, files_dir)
        rows = write_bench_images(files_dir, args.images, args.size, args.seed)
        passes: dict[int, list[Pass]] = {workers: [] for workers in args.workers}
        reference = None
        for _ in range(max(1, args.repeats)):
            for workers in args.workers:
                measured, checks = _one_pass(files_dir, rows, workers)
                passes[workers].append(measured)
                reference = reference or checks
                if checks != reference:
                    print(f"{workers} workers gave other checks than {args.workers[0]}: a bug")
                    return 1
    print(
        f"validate decode + verify + SHA-256 + pHash of {args.images} {args.size}x{args.size} "
        f"JPEG scans, {validate.available_cores()} CPU cores, median of {max(1, args.repeats)}"
    )
    print(
        f"{'workers':>7} {'how':>9} {'seconds':>8} {'images/s':>9} {'cores busy':>10} {'speed-up':>8}"
    )
    baseline = None
    for workers, measured in passes.items():
        wall = statistics.median(p.wall for p in measured)
        busy = statistics.median(p.cpu / p.wall for p in measured)
        rate = args.images / wall
        baseline = baseline or rate
        how = validate.check_pool(workers, args.images)
        print(
            f"{workers:>7} {how:>9} {wall:>8.3f} {rate:>9.1f} {busy:>10.2f} {rate / baseline:>8.2f}"
        )
    return 0
