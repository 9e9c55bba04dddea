"""The ``isdnet`` command: train, segment, rank, evaluate and demo (benchmarks: ``isdnet-bench``; web app:
``isdnet-web``).

Errors the user can fix (bad files, bad options) are printed as one plain line and exit with status 2; with
``--progress-json`` they are also emitted as an ``error`` event.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

from . import __version__
from .config import (
    DEFAULT_RANK_STRATEGY,
    DEVICES,
    PRECISIONS,
    RANK_STRATEGIES,
    UNCERTAINTIES,
    UNCERTAINTY_SUFFIX,
    VOLUME_ENDING,
    Event,
    add_train_arguments,
    config_from_arguments,
)
from .errors import ISDNetError
from .progress import Progress
from .threads import wait_passively


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on a dataset folder (Decathlon layout) or listed files")
    p.add_argument("dataset", nargs="?", type=Path, help="dataset folder with dataset.json, imagesTr/, labelsTr/")
    p.add_argument("--images", nargs="+", type=Path, help="labeled image files (instead of a dataset folder)")
    p.add_argument("--labels", nargs="+", type=Path, help="label files, one per --images entry")
    p.add_argument("--label-names", nargs="+", help="class names for --images (background first)")
    p.add_argument("--unlabeled", nargs="+", type=Path, default=[],
                   help="unlabeled images: files or folders of images")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.safetensors)")
    p.add_argument("--labeled-fraction", type=float, default=1.0,
                   help="keep labels for this fraction of the training cases, drawn with --seed "
                   "(0.5 = the paper's 1/2)")
    add_train_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint beside --out (with none yet, start from the beginning)")
    p.add_argument("--allow-new-data", action="store_true",
                   help="with --resume: go on from a checkpoint made on other cases (they are named)")
    p.add_argument("--progress-json", action="store_true", help="one JSON object per line on stdout")


def _segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment volumes with a trained model")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--confidence", action="store_true", help="also write <case>_confidence.nii.gz")
    p.add_argument("--uncertainty", choices=UNCERTAINTIES, metavar="MAP",
                   help=f"also write this uncertainty map (one of {', '.join(UNCERTAINTIES)}; 0 certain .. 1) as "
                   f"<case>{UNCERTAINTY_SUFFIX}{VOLUME_ENDING} (docs/active.md)")
    _add_inference_arguments(p)



def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """How a command that runs a model runs it (segment, rank), and its progress output."""
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")
    p.add_argument("--progress-json", action="store_true")

def _rank_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="rank unlabeled volumes: which to annotate next (docs/active.md)")
    p.add_argument("inputs", nargs="+", type=Path,
                   help="image files, folders of images, or dataset folders (their unlabeled cases)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--strategy", choices=RANK_STRATEGIES, default=DEFAULT_RANK_STRATEGY,
                   help=f"what orders the volumes (default: {DEFAULT_RANK_STRATEGY}; docs/active.md says why)")
    p.add_argument("--seed", type=int, default=0, help="the order of --strategy random")
    p.add_argument("--json", type=Path, help="also write the ranking here")
    _add_inference_arguments(p)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, global Dice and HD95 of predictions against ground truth")
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>.nii.gz label maps")
    p.add_argument("--truth", type=Path, required=True, help="dataset folder or folder of label maps")
    p.add_argument("--json", type=Path, help="write the metrics here")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate phantoms, train ISDNet on half-labeled data, segment, evaluate")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--epochs", type=int, default=None, help="default: the demo's tuned value")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isdnet", description="ISDNet: semi-supervised adversarial segmentation of medical volumes")
    parser.add_argument("--version", action="version", version=f"isdnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _segment_parser, _rank_parser, _evaluate_parser, _demo_parser):
        add(sub)
    return parser


def run_train(args: argparse.Namespace, progress: Progress) -> None:
    from .dataset import cases_from_files, load_dataset, split_labeled, unlabeled_cases
    from .train import train

    if (args.dataset is None) == (args.images is None):
        raise ISDNetError("give either a dataset folder or --images (with --labels), not both or neither")
    if args.dataset is not None:
        spec = load_dataset(args.dataset)
        labels, cases, unlabeled = spec.labels, spec.cases, list(spec.unlabeled)
        colors, terminology = spec.colors, spec.terminology
    else:
        if not args.labels or len(args.labels) != len(args.images):
            raise ISDNetError("--labels must give one label file per --images entry")
        cases = cases_from_files(args.images, args.labels)
        names = args.label_names or []
        labels, colors, terminology, unlabeled = None, None, None, []
    if args.labeled_fraction < 1.0:
        cases, drawn = split_labeled(cases, args.labeled_fraction, args.seed)
        unlabeled += drawn
    unlabeled += unlabeled_cases(args.unlabeled)
    if labels is None:
        labels, colors, terminology = _labels_from_files(cases, names)
    config = config_from_arguments(args)
    if config.class_weights is None:
        config.class_weights = [1.0] * len(labels)  # plain Dice, written into the model's provenance
    train(cases, unlabeled, labels, args.out, config, colors=colors, terminology=terminology, progress=progress,
          resume=args.resume, allow_new_data=args.allow_new_data)


def _labels_from_files(cases, names: Sequence[str]
                       ) -> tuple[dict[int, str], Optional[dict[int, list[int]]], Optional[dict[int, str]]]:
    """The classes of listed label files: (names, colours, terminology) by value. Names come from ``names``
    (background first), else from the segments of a Slicer ``.seg.nrrd`` (with their colours and terminology),
    else generic ones."""
    from .images import label_values, read_label_map
    from .segfiles import is_segmentation_file, segments_of

    found: set[int] = {0}
    for case in cases:
        found |= set(label_values(read_label_map(case.label)))
    segments = {s.value: s for s in segments_of(cases[0].label)} if is_segmentation_file(cases[0].label) else {}
    values = sorted(found | set(segments))
    if names and len(names) != len(values):
        raise ISDNetError(f"--label-names gives {len(names)} names but the labels hold {len(values)} values {values}")
    if names:
        return dict(zip(values, names)), None, None
    labels = {v: "background" if v == 0 else segments[v].name if v in segments else f"class {v}" for v in values}
    colors = {v: list(s.color) for v, s in segments.items()} or None
    terminology = {v: s.terminology for v, s in segments.items() if s.terminology} or None
    return labels, colors, terminology


def run_segment(args: argparse.Namespace, progress: Progress) -> None:
    from .files import check_outputs_apart, output_folder
    from .infer import segment
    from .modelfile import load_model
    from .outputs import output_names, segmentation_files, write_segmentation

    names = output_names(args.images)
    maps = [args.uncertainty] if args.uncertainty else []
    check_outputs_apart([p for n in names for p in segmentation_files(args.out, n, args.confidence, bool(maps))],
                        args.images)
    model = load_model(args.model)
    if maps:
        from .uncertainty import analyse, check_uncertainties

        check_uncertainties(model, maps, args.model)
    output_folder(args.out)
    for index, (image, name) in enumerate(zip(args.images, names)):

        def report(done: int, total: int, case: str = name) -> None:
            if progress.json_lines:
                progress.emit("slices", case=case, done=done, total=total)

        result = segment(image, model, batch_size=args.batch_size, device=args.device, precision=args.precision,
                         confidence=args.confidence, progress=report)
        uncertainty = None
        if maps:  # a second pass of S (and D), through the same slice preparation
            uncertainty = analyse(image, model, kinds=maps, batch_size=args.batch_size, device=args.device,
                                  precision=args.precision).maps[args.uncertainty]
        written = write_segmentation(result, model.header, args.out, name, uncertainty)
        progress.emit("case", case=name, index=index + 1, cases=len(args.images), outputs=[str(p) for p in written])
        if not progress.json_lines:
            print(f"{name}: " + ", ".join(str(p) for p in written))
    progress.emit("done", out=str(args.out))


def run_rank(args: argparse.Namespace, progress: Progress) -> None:
    from .files import check_outputs_apart
    from .rank import rank_inputs, rank_volumes
    from .rankfile import ranking_table, write_ranking

    cases = rank_inputs(args.inputs)
    if args.json is not None:
        check_outputs_apart([args.json], [case.image for case in cases])

    def report(index: int, name: str, scores: dict) -> None:
        progress.emit(Event.RANKED, case=name, index=index + 1, cases=len(cases), scores=scores)

    ranking = rank_volumes(cases, args.model, args.strategy, seed=args.seed, device=args.device,
                           precision=args.precision, batch_size=args.batch_size, progress=report)
    if args.json is not None:
        write_ranking(args.json, ranking, args.strategy, args.model)
    if progress.json_lines:
        progress.emit(Event.DONE, out=str(args.json) if args.json else None,
                      ranking=[dict(name=v.name, score=v.score) for v in ranking])
    else:
        print(ranking_table(ranking, args.strategy))


def run_evaluate(args: argparse.Namespace) -> None:
    from .files import write_atomically
    from .metrics import evaluate_folders

    metrics = evaluate_folders(args.pred, args.truth)
    text = json.dumps(metrics, indent=2)
    if args.json:
        write_atomically(args.json, text.encode("utf-8"))
    print(text)


def exit_status(program: str, work: Callable[[], None], progress: Optional[Progress] = None) -> int:
    """Run ``work`` and return the exit status: an error the user can fix becomes one line on stderr (and an
    ``error`` event for a JSON-lines reader) and status 2, an interrupt status 130. Every ISDNet command uses it."""
    try:
        work()
    except (ISDNetError, ValueError) as error:
        if progress is not None and progress.json_lines:
            progress.emit("error", message=str(error))
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    wait_passively()  # before torch loads: its threads must not spin on a shared core
    args = build_parser().parse_args(argv)
    progress = Progress(json_lines=getattr(args, "progress_json", False))

    def work() -> None:
        if args.command == "train":
            run_train(args, progress)
        elif args.command == "segment":
            run_segment(args, progress)
        elif args.command == "rank":
            run_rank(args, progress)
        elif args.command == "evaluate":
            run_evaluate(args)
        else:
            from .demo import run_demo

            run_demo(args.out, epochs=args.epochs, seed=args.seed)

    return exit_status(f"isdnet {args.command}", work, progress)


if __name__ == "__main__":
    sys.exit(main())
