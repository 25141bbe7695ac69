"""`tumorflow bench signing`: what signed decisions cost, against baselines of the same run.

Per decision: signing a `tumorflow.decision/v1` record and verifying it against a trust root,
against the plain JSON write of the same record (what an unsigned approval tag cost). Per model
load: what deploy and `serve` add before a version is served (verify its release record and
digest the SavedModel's files), against loading that SavedModel with TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tumorflow.core.artifacts import DECISION_FILE


def _median_s(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tiny_saved_model(folder: Path) -> Path:
    """A SavedModel with a serving signature (a dense layer over 64 x 64 images)."""
    import tensorflow as tf

    class Tiny(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.random.normal([64 * 64, 4]))

        @tf.function(input_signature=[tf.TensorSpec([None, 64, 64], tf.float32)])
        def serve(self, images):
            return {"scores": tf.nn.softmax(tf.reshape(images, [-1, 64 * 64]) @ self.w)}

    module = Tiny()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})
    return folder


def run(args: argparse.Namespace) -> int:
    from tumorflow.components.release.deploy import verify_release
    from tumorflow.components.release.signing import SignedRecord, generate_key
    from tumorflow.components.release.trust_root import TrustRoot, sign_decision
    from tumorflow.components.training.export import saved_model_digest

    repeats = args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        alice = generate_key(work / "alice", "alice")
        trust = TrustRoot.from_dict(
            {
                "signers": {"alice": [alice.public_key]},
                "models": {"kidney-ct": {"approval": "manual", "approvers": ["alice"]}},
            }
        )
        saved_model = Path(args.saved_model) if args.saved_model else _tiny_saved_model(work / "m")
        digest = saved_model_digest(saved_model)
        fields = dict(model_name="kidney-ct", model_version="3", serving_digest=digest)
        signed = sign_decision(alice, "approve", reason="bench", **fields)
        record = signed.record
        target = work / DECISION_FILE

        def plain_write() -> None:
            target.write_text(json.dumps(record))

        def sign_and_write() -> None:
            target.write_text(SignedRecord.sign(record, alice).to_json())

        def verify() -> None:
            trust.verify(signed, action="approve", **fields)

        def load_check() -> None:
            verify_release(
                trust,
                [{"record": record, "signature": signed.signature}],
                model_name="kidney-ct",
                model_version=None,
                serving_digest=saved_model_digest(saved_model),
                decision_digest=None,
            )

        import tensorflow as tf

        rows = [
            ("plain JSON write of a decision (baseline)", _median_s(plain_write, repeats), None),
            ("sign + write a decision", _median_s(sign_and_write, repeats), 0),
            ("verify a decision against the trust root", _median_s(verify, repeats), 0),
            (
                "SavedModel load (baseline)",
                _median_s(lambda: tf.saved_model.load(str(saved_model)), max(3, repeats // 20)),
                None,
            ),
            (
                "verify release record + digest SavedModel",
                _median_s(load_check, max(3, repeats // 20)),
                3,
            ),
        ]
    size = (
        sum(p.stat().st_size for p in saved_model.rglob("*") if p.is_file())
        if args.saved_model
        else None
    )
    print(f"bench signing: median of {repeats} runs (model loads: {max(3, repeats // 20)})")
    if size is not None:
        print(f"SavedModel {saved_model}: {size / 1e6:.1f} MB")
    for name, seconds, base in rows:
        ratio = "" if base is None else f"  {seconds / rows[base][1]:.2f}x the baseline"
        print(f"  {name:<44} {seconds * 1e3:9.3f} ms{ratio}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per measurement")
    parser.add_argument(
        "--saved-model", metavar="DIR", help="a SavedModel to digest and load (default: a tiny one)"
    )
