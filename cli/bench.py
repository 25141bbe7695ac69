"""`tumorflow bench input|serving|split|validate|explain|train|recipe|calibration|ood`: benchmarks that print ratios against a baseline of the same run."""

from __future__ import annotations

import argparse


def _run_input(args: argparse.Namespace) -> int:
    from tumorflow.bench import input as input_bench

    return input_bench.run(args)


def _run_train(args: argparse.Namespace) -> int:
    from tumorflow.bench import train as train_bench

    return train_bench.run(args)


def _run_serving(args: argparse.Namespace) -> int:
    from tumorflow.bench import serving as bench

    return bench.run(args)


def _run_split(args: argparse.Namespace) -> int:
    from tumorflow.bench import split as split_bench

    return split_bench.run(args)


def _run_validate(args: argparse.Namespace) -> int:
    from tumorflow.bench import validate as validate_bench

    return validate_bench.run(args)


def _run_explain(args: argparse.Namespace) -> int:
    from tumorflow.bench import pointing_game

    return pointing_game.run(args)


def _run_route(args: argparse.Namespace) -> int:
    from tumorflow.bench import route as route_bench

    return route_bench.run(args)


def _run_recipe(args: argparse.Namespace) -> int:
    from tumorflow.bench import recipe as recipe_bench

    return recipe_bench.run(args)


def _run_signing(args: argparse.Namespace) -> int:
    from tumorflow.bench import signing as signing_bench

    return signing_bench.run(args)


def _run_calibration(args: argparse.Namespace) -> int:
    from tumorflow.bench import calibration as calibration_bench

    return calibration_bench.run(args)


def _run_ood(args: argparse.Namespace) -> int:
    from tumorflow.bench import ood as ood_bench

    return ood_bench.run(args)


def register(subparsers: argparse._SubParsersAction) -> None:
    from tumorflow.bench.input import add_arguments as add_input_arguments
    from tumorflow.bench.serving import add_arguments as add_serving_arguments
    from tumorflow.bench.split import add_arguments as add_split_arguments
    from tumorflow.bench.train import add_arguments as add_train_arguments

    parser = subparsers.add_parser(
        "bench", help="measure the input pipeline, training, the server or duplicate grouping"
    )
    which = parser.add_subparsers(dest="bench", metavar="WHAT", required=True)
    input_parser = which.add_parser(
        "input", help="training input pipeline vs the Keras baseline and bare decoding"
    )
    add_input_arguments(input_parser)
    input_parser.set_defaults(handler=_run_input)
    train_parser = which.add_parser(
        "train", help="training images/s per replica count, with the scaling efficiency"
    )
    add_train_arguments(train_parser)
    train_parser.set_defaults(handler=_run_train)
    serving_parser = which.add_parser(
        "serving", help="gRPC Predict vs in-process calls and a Flask baseline"
    )
    add_serving_arguments(serving_parser)
    serving_parser.set_defaults(handler=_run_serving)
    split_parser = which.add_parser(
        "split", help="near-duplicate grouping: all-pairs vs the multi-index search"
    )
    add_split_arguments(split_parser)
    split_parser.set_defaults(handler=_run_split)
    from tumorflow.bench.validate import add_arguments as add_validate_arguments

    validate_parser = which.add_parser(
        "validate", help="the validate step's decoding and hashing on 1, 2, ... worker processes"
    )
    add_validate_arguments(validate_parser)
    validate_parser.set_defaults(handler=_run_validate)

    from tumorflow.bench.pointing_game import add_arguments as add_explain_arguments

    explain_parser = which.add_parser(
        "explain", help="pointing game of the explain signature's heat map on phantom lesions"
    )
    add_explain_arguments(explain_parser)
    explain_parser.set_defaults(handler=_run_explain)

    from tumorflow.bench.recipe import add_arguments as add_recipe_arguments

    recipe_parser = which.add_parser(
        "recipe", help="epoch-to-epoch val swing of custom_cnn from scratch per training recipe"
    )
    add_recipe_arguments(recipe_parser)
    recipe_parser.set_defaults(handler=_run_recipe)

    from tumorflow.bench.signing import add_arguments as add_signing_arguments

    signing_parser = which.add_parser(
        "signing", help="cost of signing and verifying decisions and of the check at model load"
    )
    add_signing_arguments(signing_parser)
    signing_parser.set_defaults(handler=_run_signing)

    from tumorflow.bench.route import add_arguments as add_route_arguments

    route_parser = which.add_parser(
        "route", help="PACS instances/s fetched, classified and stored back vs fetch and predict"
    )
    add_route_arguments(route_parser)
    route_parser.set_defaults(handler=_run_route)

    from tumorflow.bench.calibration import add_arguments as add_calibration_arguments

    calibration_parser = which.add_parser(
        "calibration", help="test ECE before and after temperature scaling on both phantoms"
    )
    add_calibration_arguments(calibration_parser)
    calibration_parser.set_defaults(handler=_run_calibration)

    from tumorflow.bench.ood import add_arguments as add_ood_arguments

    ood_parser = which.add_parser(
        "ood", help="share of unseen kinds of image flagged OOD, and of phantom scans rejected"
    )
    add_ood_arguments(ood_parser)
    ood_parser.set_defaults(handler=_run_ood)
