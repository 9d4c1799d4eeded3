"""The ``medsegsuite`` command line.

Exit status: 0 on success, 2 when the input, model or options are unusable (with a
one-line reason on stderr), 130 when interrupted, 1 for unexpected failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import Cancelled, MedSegSuiteError

__all__ = ["main"]

log = logging.getLogger("medsegsuite")


class ProgressBar:
    """A tqdm bar per stage on stderr, fed by ``(done, total, stage)`` callbacks.

    Shown only when stderr is a terminal (logs and pipes stay clean) and only for
    stages counted in more than one unit (slices, windows, iterations).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.stage: Optional[str] = None
        self.postfix: dict[str, str] = {}

    def __call__(self, done: int, total: int, stage: str) -> None:
        if not self.enabled or total <= 1:
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None or self.bar.total != total:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.n = done
        if self.postfix:
            self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.refresh()

    def note(self, entry: dict[str, Any]) -> None:
        """Show a training record's loss or latest validation Dice beside the bar."""
        if "loss" in entry:
            self.postfix["loss"] = f"{entry['loss']:.4f}"
        if entry.get("val_dice") is not None:
            self.postfix["val Dice"] = f"{entry['val_dice']:.4f}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- models ----------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    from .models import ModelRegistry

    registry = ModelRegistry()
    action = getattr(args, "models_action", None)
    if action == "import":
        entry = registry.import_model(args.source, card=args.card, model_id=args.id, overwrite=args.overwrite)
        print(f"imported {entry.card.id} {entry.card.version} into {entry.directory}")
        return 0
    if action == "show":
        print(json.dumps(registry.resolve(args.model).card.to_dict(), indent=2))
        return 0
    if action == "remove":
        registry.remove(args.model)
        print(f"removed {args.model}")
        return 0
    if action == "path":
        print(f"bundled: {registry.bundled_dir}\nuser:    {registry.user_dir}")
        return 0
    entries = registry.entries()
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                [{**e.card.to_dict(), "source": e.source, "directory": str(e.directory)} for e in entries], indent=2
            )
        )
        return 0
    if not entries:
        print(f"no models installed (bundled: {registry.bundled_dir}, user: {registry.user_dir})")
        return 0
    rows = []
    for entry in entries:
        row = entry.summary()
        row["labels"] = ",".join(row["labels"])
        row["parent"] = row["parent"] or "-"
        verdict = entry.card.training.get("finetune", {}).get("verdict") if entry.card.parent else None
        if isinstance(verdict, dict) and not verdict.get("selected", True):
            row["parent"] += f" ({verdict.get('outcome')}, not selected)"
        rows.append(row)
    _print_table(rows, ("id", "version", "network", "dims", "labels", "licence", "source", "parent"))
    return 0


# -- segment ---------------------------------------------------------------------------------
MAX_BATCH_SIZE = 4096
MAX_ENSEMBLE = 64
MAX_STEPS = 10000


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse, before any work, counts and fractions no run can use (absurd batch sizes, ensembles...)."""
    from .errors import InputError

    batch = getattr(args, "batch_size", None)
    if batch is not None and not 1 <= batch <= MAX_BATCH_SIZE:
        raise InputError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}, got {batch}")
    overlap = getattr(args, "overlap", None)
    if overlap is not None and not 0 <= overlap < 1:
        raise InputError(f"--overlap must be at least 0 and below 1, got {overlap}")
    ensemble = getattr(args, "ensemble", None)
    if ensemble is not None and not 1 <= ensemble <= MAX_ENSEMBLE:
        raise InputError(f"--ensemble must be between 1 and {MAX_ENSEMBLE}, got {ensemble}")
    steps = getattr(args, "steps", None)
    if steps is not None and not 0 <= steps <= MAX_STEPS:
        raise InputError(f"--steps must be between 0 and {MAX_STEPS}, got {steps}")


def _check_resampled_size(volume, card, roi, overlap: Optional[float]) -> None:  # noqa: ANN001
    """See :func:`MedSegSuiteLib.batch.check_resampled_size`."""
    from .batch import check_resampled_size

    check_resampled_size(volume, card, roi, overlap)


def _write_labels(labels, card, path, table_path, warnings: Sequence[str] = ()) -> None:  # noqa: ANN001
    """See :func:`MedSegSuiteLib.batch.write_labels` (names, colours and terminology from the card);
    ``warnings`` (the input did not fit the model) are recorded in the .seg.nrrd header or the label table."""
    from .batch import write_labels
    from .io.atomic import compound_suffix

    write_labels(labels, card.labels, path, table_path, source=f"the result of {card.id}")
    if not warnings:
        return
    if compound_suffix(path) == ".seg.nrrd":
        from .io.seg_nrrd import write_seg_nrrd
        from .io.segmentation import Segmentation

        segmentation = Segmentation.from_label_map(labels, card.labels, source=f"the result of {card.id}")
        write_seg_nrrd(segmentation, path, overwrite=True, extra={"MedSegSuite_InputWarnings": " | ".join(warnings)})
    elif table_path is not None:
        from .io.label_table import write_label_table

        write_label_table(card.labels, table_path, overwrite=True, notes=warnings)


def _cmd_segment(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from .batch import is_batch_input
    from .errors import InputError
    from .export import table_path_for
    from .geometry import Box, crop
    from .inference import Predictor
    from .io import read_image, write_image
    from .io.atomic import atomic_outputs, check_targets, compound_suffix
    from .models import ModelRegistry, load_model
    from .preprocessing import check_channels

    if len(args.model) > 1 or args.shard or is_batch_input(args.input):
        return _segment_batch(args)
    model_name = args.model[0]
    output = Path(args.output)
    slicer_file = compound_suffix(output) == ".seg.nrrd"
    table = None if slicer_file else table_path_for(output)  # a label map gets its label table beside it
    targets = [output] + ([table] if table else []) + ([Path(args.scores)] if args.scores else [])
    for path in [output] + ([Path(args.scores)] if args.scores else []):
        if path.exists() and not args.overwrite:
            raise InputError(f"{path} already exists; pass --overwrite to replace it")
        allowed = (".nrrd", ".nii", ".nii.gz", ".mha", ".png", ".tif", ".tiff")
        allowed += (".seg.nrrd",) if path == output else ()
        if compound_suffix(path) not in allowed:
            raise InputError(
                f"{path.name}: write the result as .seg.nrrd, .nrrd, .nii.gz, .nii, .mha, or .png for 2D images"
            )
    _check_counts(args)
    check_targets(targets, overwrite=args.overwrite)
    roi = Box.parse(args.roi) if args.roi else None
    volume = read_image(args.input, series_uid=args.series_uid)
    entry = ModelRegistry().resolve(model_name)
    check_channels(volume.channels, entry.card.input.channels, model=f"model {entry.card.id!r}")
    model = load_model(entry)
    if args.batch_size:
        from .models.footprint import check_batch_fits

        check_batch_fits(model.card, args.batch_size)
    _check_resampled_size(volume, model.card, roi, args.overlap)
    from .io.photos import prepare_photo

    shown, put_back, changes = prepare_photo(args.input, volume, model.card.input.normalization)
    if roi is not None and shown.shape != volume.shape:
        raise InputError("--roi cannot be used with a photo its EXIF orientation turns; rotate the file first")
    for change in changes:
        print(f"note: {Path(args.input).name}: {change}", file=sys.stderr)
    from .inference.fit_check import fit_warnings

    warnings = fit_warnings(crop(shown, roi) if roi is not None else shown, model.card)
    for warning in warnings:
        print(f"warning: {Path(args.input).name}: {warning}", file=sys.stderr)
    predictor = Predictor(model, device=args.device, batch_size=args.batch_size, overlap=args.overlap, fast=args.fast)
    log.info("segmenting %s with %s on %s", args.input, model.card.id, predictor.device)
    bar = ProgressBar(enabled=not args.quiet)
    try:
        result = predictor.predict(shown, roi=roi, scores=bool(args.scores), progress=bar)
    finally:
        bar.close()
    if changes:
        result = dataclasses.replace(
            result,
            labels=put_back(result.labels),
            scores=None if result.scores is None else put_back(result.scores),
        )
    with atomic_outputs(targets, overwrite=args.overwrite) as temps:
        _write_labels(result.labels, model.card, temps[0], temps[1] if table else None, warnings)
        if args.scores:
            if result.scores is None:
                raise InputError(f"{model.card.id} gives no per-class scores; leave out --scores")
            write_image(result.scores, temps[-1], overwrite=True)
    counts = {label.name: int((result.labels.array == label.value).sum()) for label in model.card.labels}
    if not args.quiet:
        unit = "pixels" if volume.is_2d else "voxels"
        print(f"wrote {output} ({', '.join(f'{name}: {n} {unit}' for name, n in counts.items())})")
    return 0


def _segment_batch(args: argparse.Namespace) -> int:
    """``segment`` over many cases (a folder, list or CSV), several models (-m ...) or one shard."""
    from pathlib import Path

    from .batch import BatchSegmenter, find_cases, parse_shard, select_shard, write_summary
    from .batch.cases import IMAGE_SUFFIXES
    from .errors import InputError
    from .inference import Predictor
    from .io.atomic import compound_suffix
    from .models import ModelRegistry, load_model

    for option, given in (("--roi", args.roi), ("--scores", args.scores), ("--series-uid", args.series_uid)):
        if given:
            raise InputError(f"{option} applies to one image; leave it out when segmenting many cases or models")
    output = Path(args.output)
    if compound_suffix(output) in IMAGE_SUFFIXES + (".seg.nrrd",) or (output.exists() and not output.is_dir()):
        raise InputError(f"-o {output}: name a folder for the results of many cases or several models")
    _check_counts(args)
    shard = parse_shard(args.shard) if args.shard else None
    cases = find_cases(args.input)
    chosen = select_shard(cases, *shard) if shard else cases
    registry = ModelRegistry()
    predictors = []
    for name in args.model:
        model = load_model(name, registry)
        if args.batch_size:
            from .models.footprint import check_batch_fits

            check_batch_fits(model.card, args.batch_size)
        predictors.append(
            Predictor(model, device=args.device, batch_size=args.batch_size, overlap=args.overlap, fast=args.fast)
        )
    models = [p.card.id for p in predictors]
    where = f" (shard {shard[0]}/{shard[1]} of {len(cases)})" if shard else ""
    log.info("segmenting %d case(s)%s with %s", len(chosen), where, ", ".join(models))
    cases_bar, windows_bar = ProgressBar(enabled=not args.quiet), ProgressBar(enabled=not args.quiet)
    done: list = []

    def on_case(outcome) -> None:  # noqa: ANN001
        done.append(outcome)
        write_summary(done, output, models, shard)  # kept current: a crash leaves the summary of finished cases
        if not args.quiet:
            windows_bar.close()
            reason = f": {outcome.error}" if outcome.error else ""
            print(f"[{len(done)}/{len(chosen)}] {outcome.id}: {outcome.status} ({outcome.seconds:.1f} s){reason}")

    segmenter = BatchSegmenter(
        predictors, output, overwrite=args.overwrite, progress=cases_bar, window_progress=windows_bar, on_case=on_case
    )
    try:
        outcomes = segmenter.run(chosen)
    except KeyboardInterrupt:
        windows_bar.close()
        print(
            f"medsegsuite: interrupted after {len(done)} of {len(chosen)} case(s); finished cases are kept and "
            "listed in the summary; run the same command again to do the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        windows_bar.close()
        cases_bar.close()
    csv_path, json_path = write_summary(outcomes, output, models, shard)
    failed = [o for o in outcomes if o.status == "failed"]
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(
        f"{len(outcomes) - len(failed) - skipped} case(s) segmented, {skipped} already complete, "
        f"{len(failed)} failed{where}; summary in {csv_path} and {json_path}"
    )
    for outcome in failed:
        print(f"medsegsuite: case {outcome.id} failed: {outcome.error}", file=sys.stderr)
    return 2 if failed else 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .batch import merge_summaries

    csv_path, json_path, counts = merge_summaries(Path(args.folder))
    print(
        f"merged {sum(counts.values())} case(s) ({counts['done']} segmented, {counts['skipped']} already complete, "
        f"{counts['failed']} failed) into {csv_path} and {json_path}"
    )
    return 2 if counts["failed"] else 0


# -- refine ----------------------------------------------------------------------------------
def _read_mask(path: str, card, volume):  # noqa: ANN001, ANN202
    """The mask to refine on ``volume``'s grid: a label map (0/255 masks read as 0/1), or a Slicer
    ``.seg.nrrd`` / DICOM SEG matched to the model's labels; one cropped on the image's lattice is
    padded back."""
    from .export import import_labels, read_label_map
    from .io.atomic import compound_suffix

    if compound_suffix(path) in (".seg.nrrd", ".dcm"):
        return import_labels(path, card.labels, volume)
    mask = read_label_map(path)
    if mask.grid.same_as(volume.grid, atol=1e-3) or compound_suffix(path) in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        return mask  # photos carry no geometry: a mask of another size is refused by the refiner
    from .io.segmentation import Segmentation

    segmentation = Segmentation.from_label_map(mask, None, source=str(path)).on_grid(volume.grid, what=path)
    return segmentation.to_label_map("refuse")[0]


def _cmd_refine(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import InputError
    from .geometry import Box
    from .io import read_image, write_image
    from .io.atomic import atomic_outputs, check_targets, compound_suffix
    from .models import ModelRegistry, load_model
    from .refine.refinement import Refiner

    targets = [Path(args.output)] + ([Path(args.uncertainty)] if args.uncertainty else [])
    for path in targets:
        if path.exists() and not args.overwrite:
            raise InputError(f"{path} already exists; pass --overwrite to replace it")
        if compound_suffix(path) not in (".nrrd", ".nii", ".nii.gz", ".mha", ".png"):
            raise InputError(f"{path.name}: write the result as .nrrd, .nii.gz, .nii, .mha, or .png for 2D images")
    if args.uncertainty and args.ensemble < 2:
        raise InputError("--uncertainty needs --ensemble 2 or more (the spread of several chains)")
    _check_counts(args)
    check_targets(targets, overwrite=args.overwrite)
    volume = read_image(args.input)
    model = load_model(args.model, ModelRegistry())
    mask = _read_mask(args.mask, model.card, volume)
    keep = read_image(args.keep) if args.keep else None
    refiner = Refiner(model, device=args.device)
    bar = ProgressBar(enabled=not args.quiet)
    try:
        result = refiner.refine(
            volume,
            mask,
            args.steps,
            keep=keep,
            scope=args.scope,
            slice_index=args.slice,
            roi=Box.parse(args.roi) if args.roi else None,
            seed=args.seed,
            ensemble=args.ensemble,
            progress=bar,
            neighbours=args.neighbours,
            spread=args.spread,
        )
    finally:
        bar.close()
    with atomic_outputs(targets, overwrite=args.overwrite) as temps:
        write_image(result.labels, temps[0], overwrite=True)
        if args.uncertainty:
            if result.uncertainty is None:
                raise InputError("--uncertainty needs --ensemble 2 or more")
            write_image(result.uncertainty, temps[1], overwrite=True)
    changed = int((result.labels.array != mask.array).sum())
    if not args.quiet:
        unit = "pixel(s)" if volume.is_2d else "voxel(s)"
        print(f"wrote {args.output}: {changed} {unit} changed on {len(result.slices)} slice(s)")
    return 0


# -- train -----------------------------------------------------------------------------------
def _numbers(text: Optional[str], count: int, kind: type, what: str) -> Optional[list]:
    from .errors import InputError

    if text is None:
        return None
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise InputError(f"{what} must be {count} comma-separated numbers, got {text!r}")
    return values


def _label_table(text: Optional[str]) -> Optional[list[dict[str, Any]]]:
    """``"1:Anterior,2:Posterior"``, or a JSON file holding a list of card label entries."""
    from pathlib import Path

    from .errors import InputError

    if text is None:
        return None
    if text.endswith(".json"):
        try:
            table = json.loads(Path(text).read_text(encoding="utf-8"))
        except OSError as error:
            raise InputError(f"cannot read the label table {text}: {error.strerror or error}") from None
        except ValueError as error:
            raise InputError(f"the label table {text} is not valid JSON ({error})") from None
        if not isinstance(table, list):
            raise InputError(
                f"the label table {text} must hold a JSON list of labels, like the 'labels' of a model card"
            )
        return table
    table = []
    for item in text.split(","):
        value, _, name = item.partition(":")
        if not value.strip().isdigit() or not name.strip():
            raise InputError(f"--labels must look like 1:Liver,2:Spleen (or name a .json file), got {text!r}")
        table.append({"value": int(value), "name": name.strip()})
    return table


def _config(items: Sequence[str]) -> dict[str, Any]:
    import ast

    from .errors import InputError

    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--config takes key=value, got {item!r}")
        try:
            config[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[key] = value
    return config


class _StopOnCtrlC:
    """While active, the first Ctrl-C sets ``event`` (a long job then saves its checkpoint and stops);
    a second one interrupts at once. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        import threading

        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> _StopOnCtrlC:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)

            def stop(signum: int, frame: Any) -> None:
                self.event.set()
                signal.signal(signal.SIGINT, self._previous)
                print("\nmedsegsuite: stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr)

            signal.signal(signal.SIGINT, stop)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _stopped(error: Exception) -> int:
    """Report a job stopped by Ctrl-C (its checkpoint kept); exit status 130."""
    print(f"medsegsuite: {error}; continue with the same command and --resume", file=sys.stderr)
    return 130


def _cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training.distributed import start
    from .training.jobs import TrainOptions, train_model

    context, args.device = start(args.device)  # under torchrun: join the other processes
    main_rank = context is None or context.is_main

    options = TrainOptions(
        network=args.network,
        data=Path(args.data),
        output=Path(args.output),
        model_id=args.id or Path(args.output).name.lower(),
        preset=args.preset,
        name=args.name,
        description=args.description or "",
        dims=args.dims,
        labels=_label_table(args.labels),
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        size_xy=_numbers(args.size, 2, int, "--size"),
        patch_xyz=_numbers(args.patch, 3, int, "--patch"),
        spacing=_numbers(args.spacing, 3, float, "--spacing"),
        h5_spacing=_numbers(args.h5_spacing, 3, float, "--h5-spacing") or (1.0, 1.0, 1.0),
        val_fraction=args.val_fraction,
        val_ids=Path(args.val_ids).read_text(encoding="utf-8").split() if args.val_ids else None,
        seed=args.seed,
        device=args.device,
        data_licence=args.data_licence,
        config=_config(args.config),
        validate_every=args.validate_every,
        labelled_cases=args.labelled_cases,
        recipe=_config(args.recipe),
        init_encoder=args.init_encoder,
        init_weights=args.init_weights,
    )
    bar = ProgressBar(enabled=not args.quiet and main_rank)
    try:
        with _StopOnCtrlC() as stop:
            entry = train_model(
                options, progress=bar, cancel=stop.event, resume=args.resume, overwrite=args.overwrite, on_log=bar.note
            )
    except Cancelled as error:
        return _stopped(error)
    finally:
        bar.close()
    if entry is None:  # another rank wrote the model
        return 0
    dice = next((m["value"] for m in entry.card.metrics if m["name"] == "dice"), None)
    print(f"wrote {entry.directory} (validation Dice {dice})")
    return 0


# -- finetune --------------------------------------------------------------------------------
def _cmd_finetune(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .training.distributed import start
    from .training.finetune import FinetuneOptions, finetune_model

    context, args.device = start(args.device)  # under torchrun: join the other processes
    options = FinetuneOptions(
        parent=args.model,
        labelled=args.labelled,
        unlabelled=args.unlabelled,
        output=Path(args.output) if args.output else None,
        model_id=args.id,
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        held_out=args.held_out,
        resample=args.resample,
        h5_spacing=_numbers(args.h5_spacing, 3, float, "--h5-spacing") or (1.0, 1.0, 1.0),
        keep_if_worse=args.keep_if_worse,
    )
    bar = ProgressBar(enabled=not args.quiet and (context is None or context.is_main))
    try:
        with _StopOnCtrlC() as stop:
            entry = finetune_model(options, progress=bar, cancel=stop.event, resume=args.resume)
    except Cancelled as error:
        return _stopped(error)
    finally:
        bar.close()
    if entry is None:  # another rank wrote and registered the model
        return 0
    print(_finetune_report(entry))
    return 0


def _finetune_report(entry: Any) -> str:
    """What a finished finetuning tells the user: where the model is, and in plain words whether it is better."""
    from .training.verdict import FinetuneVerdict

    card = entry.card
    facts = card.training.get("finetune", {})
    verdict = FinetuneVerdict.from_dict(facts.get("verdict"))
    head = f"registered {card.id} (parent {card.parent}) in {entry.directory}"
    if verdict is None:
        return head
    lines = [f"{head}; checked on {facts.get('split', '')}", verdict.sentence(card.parent or "the parent")]
    if verdict.better:
        lines.append(f"Selected: use it with -m {card.id}.")
    elif verdict.selected:
        lines.append(f"Kept as selected anyway, as asked (--keep-if-worse); use it with -m {card.id}.")
    else:
        lines.append(
            f"WARNING: {card.id} is NOT selected; keep using {card.parent}. It stays registered: "
            f"use it explicitly with -m {card.id}, or remove it with `medsegsuite models remove {card.id}`."
        )
    return "\n".join(lines)


# -- evaluate --------------------------------------------------------------------------------
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import InputError
    from .evaluation import evaluate_folders, evaluate_model
    from .inference import Predictor
    from .io import write_image
    from .io.atomic import atomic_output, check_targets
    from .models import ModelRegistry, load_model
    from .training.datasets import discover_cases, load_case

    overwrite = getattr(args, "overwrite", False)
    if args.json:
        if Path(args.json).exists() and not overwrite:
            raise InputError(f"{args.json} already exists; pass --overwrite to replace it")
        check_targets([Path(args.json)], overwrite=overwrite)
    if args.model:
        if args.data is None or args.folders:
            raise InputError("with --model give the labelled cases as --data DIR (and no PRED_DIR GT_DIR)")
        model = load_model(args.model, ModelRegistry())
        predictor = Predictor(model, device=args.device, fast=args.fast)
        cases = discover_cases(args.data, require_labels=True)
        if args.ids:
            wanted = set(Path(args.ids).read_text(encoding="utf-8").split())
            cases = [c for c in cases if c.id in wanted]
            if not cases:
                raise InputError(f"none of the ids in {args.ids} is a case in {args.data}")
        h5_spacing = _numbers(args.h5_spacing, 3, float, "--h5-spacing") or (1.0, 1.0, 1.0)
        save = Path(args.save_predictions) if args.save_predictions else None
        if save is not None:
            if save.exists() and not save.is_dir():
                raise InputError(f"--save-predictions {save} is a file; name a folder")
            taken = [c.id for c in cases if (save / f"{c.id}.nii.gz").exists()]
            if taken and not overwrite:
                raise InputError(
                    f"{save} already holds predictions of {len(taken)} case(s) (e.g. {taken[0]}.nii.gz); "
                    "pass --overwrite to replace them or choose another folder"
                )
        loaded = [(c.id, *load_case(c, h5_spacing)) for c in cases]
        if save is not None:
            try:
                save.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise InputError(f"cannot create {save}: {error.strerror or error}; choose another folder") from None

        def keep(case_id: str, labels) -> None:  # noqa: ANN001
            if save is not None:
                write_image(labels, save / f"{case_id}.nii.gz", overwrite=overwrite)

        bar = ProgressBar(enabled=not args.quiet)
        try:
            result = evaluate_model(predictor, loaded, progress=bar, on_prediction=keep)
        finally:
            bar.close()
    else:
        if len(args.folders) != 2:
            raise InputError("give PRED_DIR GT_DIR, or --model MODEL --data DIR")
        values = [int(v) for v in args.labels.split(",")] if args.labels else None
        result = evaluate_folders(args.folders[0], args.folders[1], values)
    if not args.quiet:
        print(result.table())
    if result.missing:
        shown = ", ".join(result.missing[:5]) + (", ..." if len(result.missing) > 5 else "")
        print(
            f"warning: {len(result.missing)} reference case(s) have no prediction and are not in the mean: {shown}",
            file=sys.stderr,
        )
    if result.unmatched:
        shown = ", ".join(result.unmatched[:5]) + (", ..." if len(result.unmatched) > 5 else "")
        print(f"warning: {len(result.unmatched)} prediction(s) have no reference: {shown}", file=sys.stderr)
    if args.json:
        with atomic_output(args.json, overwrite=overwrite) as tmp:
            Path(tmp).write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")
    mean = result.mean()
    dice = "n/a (no label present in any case)" if mean["dice"] is None else f"{mean['dice']:.4f}"
    print(
        f"mean Dice {dice} over {mean['cases']} case(s)"
        + (f", HD95 {mean['hd95']:.2f} mm" if mean["hd95"] is not None else "")
        + (f"; {mean['missing']} reference case(s) without prediction" if mean["missing"] else "")
    )
    return 0


# -- export ----------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    written = export(
        args.segmentation,
        args.output,
        reference=args.reference,
        labels=args.labels,
        dicom_series=args.dicom_series,
        overwrite=args.overwrite,
        overlap=args.overlap,
        resample=args.resample,
        series_uid=args.series_uid,
    )
    if not args.quiet:
        print("wrote " + " and ".join(str(path) for path in written))
    return 0


# -- demo ------------------------------------------------------------------------------------
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import SAMPLE_NAME, run_demo

    result = run_demo(args.output, model=args.model, device=args.device)
    for warning in result.warnings:
        print(f"warning: {SAMPLE_NAME}: {warning}", file=sys.stderr)
    scores = ", ".join(f"{name} {value:.3f}" for name, value in result.dice.items())
    mean = sum(result.dice.values()) / len(result.dice)
    print(f"segmented the bundled hippocampus MRI sample with {args.model} in {result.seconds:.1f} s")
    print(f"Dice against the sample's reference label: {scores} (mean {mean:.3f})")
    print(f"wrote {result.labels_path} and {result.overlay_path}")
    return 0


# -- parser ----------------------------------------------------------------------------------
DEVICE_HELP = "where to run: auto (a GPU if there is one), cpu, cuda, cuda:N or mps"


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows an option's default wherever it has one worth showing and the text names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """A sub-command's parser: defaults in its help, and ``-v``/``--debug`` accepted after the sub-command too
    (left unset there unless given, so the value given before the sub-command stands)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens")
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``medsegsuite`` (sub-commands register their handler as ``func``)."""
    parser = argparse.ArgumentParser(
        prog="medsegsuite",
        description="Medical image segmentation with five published networks. "
        "-v and --debug work before or after the command.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medsegsuite {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    models = commands.add_parser(
        "models", help="list, show, import or remove models", description="Without an action: list the models."
    )
    models.add_argument("--json", action="store_true", help="print the full model cards as JSON")
    models.set_defaults(func=_cmd_models)
    actions = models.add_subparsers(dest="models_action", metavar="ACTION")
    listing = actions.add_parser("list", help="list bundled and user models (what plain `models` does)")
    listing.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the full model cards as JSON"
    )
    imp = actions.add_parser("import", help="import a weights file, model folder or .zip into the user models")
    imp.add_argument("source", help=".safetensors, .pth/.pt/.ckpt, a model folder, or a .zip of one")
    imp.add_argument("--card", help="model card JSON (needed for .pth files without one)")
    imp.add_argument("--id", help="import under this model id")
    imp.add_argument("--overwrite", action="store_true", help="replace a user model with the same id")
    show = actions.add_parser("show", help="print a model's card")
    show.add_argument("model", help="model id or model folder")
    rm = actions.add_parser("remove", help="delete a user model")
    rm.add_argument("model", help="model id")
    actions.add_parser("path", help="print the bundled and user model folders")

    seg = commands.add_parser("segment", help="segment an image with a model")
    seg.add_argument(
        "input",
        help="NIfTI (.nii, .nii.gz), NRRD, MetaImage (.mha, .mhd), a DICOM series folder or file, "
        "or a 2D PNG, JPEG, TIFF, BMP or GIF image; or many cases: a folder of images and DICOM series "
        "folders, a list file (.txt, one path per line) or a CSV with an 'image' (and 'id') column",
    )
    seg.add_argument(
        "-m",
        "--model",
        required=True,
        action="append",
        help="model id (see `medsegsuite models`) or model folder; give -m several times to compare models "
        "(each writes into OUTPUT/<model id>/, the summary adds their Dice and a disagreement map)",
    )
    seg.add_argument(
        "-o",
        "--output",
        required=True,
        help="label map to write: .nrrd, .nii.gz, .nii, .mha, or .png/.tif for 2D images (a .png holds the label "
        "values 0, 1, 2..., so it looks black in a photo viewer); for many cases or models a folder that gets "
        "<case id>.nii.gz per case and summary.csv/summary.json",
    )
    seg.add_argument("--device", default="auto", help=DEVICE_HELP)
    seg.add_argument("--roi", help="segment only inside x0,y0,z0,x1,y1,z1 (voxel indices, end exclusive)")
    seg.add_argument("--scores", help="also write per-class probabilities to this file")
    seg.add_argument("--batch-size", type=int, help="slices or windows per network call")
    seg.add_argument("--overlap", type=float, help="3D window overlap in [0, 1)")
    seg.add_argument("--fast", action="store_true", help="quicker 3D inference (the model's fast settings)")
    seg.add_argument("--series-uid", help="DICOM series to read when the folder holds several")
    seg.add_argument(
        "--shard",
        metavar="I/N",
        help="segment only every N-th case starting at case I (0 <= I < N), e.g. $SLURM_ARRAY_TASK_ID/4; "
        "join the shards' summaries with `medsegsuite merge`",
    )
    seg.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (many cases: recompute cases an earlier run completed)",
    )
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    seg.set_defaults(func=_cmd_segment)

    merge = commands.add_parser(
        "merge", help="join the summaries of `segment --shard` runs into one summary.csv and summary.json"
    )
    merge.add_argument("folder", help="the output folder the shards wrote into")
    merge.set_defaults(func=_cmd_merge)

    ref = commands.add_parser("refine", help="HiDiff refinement steps starting from a (corrected) mask")
    ref.add_argument("input", help="the image the mask belongs to (any format `segment` reads)")
    ref.add_argument("--mask", required=True, help="label map to refine (same grid as the image)")
    ref.add_argument("-m", "--model", required=True, help="a HiDiff model (id or folder)")
    ref.add_argument(
        "--steps", type=int, required=True, help="diffusion steps (0 returns the mask; more moves further)"
    )
    ref.add_argument("--keep", help="voxels (non-zero) that must not change, e.g. your own edits")
    ref.add_argument(
        "--scope",
        default="volume",
        choices=("volume", "slice", "neighbours", "roi"),
        help="refine the whole volume, one slice, one slice and its neighbours, or a box",
    )
    ref.add_argument("--slice", type=int, help="axial slice index for --scope slice or neighbours (0 = most inferior)")
    ref.add_argument(
        "--neighbours", type=int, default=2, help="slices on either side for --scope neighbours (default: 2)"
    )
    ref.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="0-1: how strongly your edited slices guide the slices beside them (up to --neighbours away)",
    )
    ref.add_argument("--roi", help="x0,y0,z0,x1,y1,z1 voxel box for --scope roi")
    ref.add_argument("--seed", type=int, default=0, help="same seed, same result")
    ref.add_argument("--ensemble", type=int, default=1, help="average this many chains (2+ gives an uncertainty map)")
    ref.add_argument("--uncertainty", help="write the per-voxel uncertainty (needs --ensemble 2+)")
    ref.add_argument(
        "-o", "--output", required=True, help="refined label map to write (.nrrd, .nii.gz, .nii, .mha, .png)"
    )
    ref.add_argument("--device", default="auto", help=DEVICE_HELP)
    ref.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ref.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    ref.set_defaults(func=_cmd_refine)

    train = commands.add_parser("train", help="train a model on a folder of labelled images")
    train.add_argument("--network", required=True, help="network to train (unet, condseg, banet, dnet, canet, hidiff)")
    train.add_argument("--data", required=True, help="images/ + labels/ (or masks/) folder, .h5 folder, or list file")
    train.add_argument("-o", "--output", required=True, help="model folder to create")
    train.add_argument("--id", help="model id (default: the output folder's name)")
    train.add_argument("--name", help="display name")
    train.add_argument("--description", help="one paragraph for the model card")
    train.add_argument(
        "--preset",
        default="lite",
        choices=("lite", "paper"),
        help="network size: lite (small, for CPUs and quick runs) or paper (as published)",
    )
    train.add_argument("--dims", type=int, choices=(2, 3), help="2: slice-wise, 3: volumetric (default: from data)")
    train.add_argument("--labels", help="label names, e.g. 1:Anterior,2:Posterior, or a JSON list of card labels")
    train.add_argument("--iterations", type=int, help="training iterations (default: the recipe's)")
    train.add_argument("--batch-size", type=int, help="images or patches per iteration (default: the recipe's)")
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--size", help="2D input size x,y (default: the recipe's)")
    train.add_argument("--patch", help="3D patch size x,y,z (default: the recipe's)")
    train.add_argument("--spacing", help="resample 3D data to this spacing x,y,z mm (recorded in the card)")
    train.add_argument("--h5-spacing", help="voxel spacing x,y,z mm of HDF5 data, which stores none (default 1,1,1)")
    train.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out for validation")
    train.add_argument("--val-ids", help="file listing the validation case ids (instead of --val-fraction)")
    train.add_argument("--validate-every", type=int, default=0, help="iterations between validations")
    train.add_argument("--seed", type=int, default=0, help="same seed, same split and same run")
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.add_argument("--data-licence", default="unspecified", help="the training data's licence, for the card")
    train.add_argument("--config", nargs="*", default=[], help="network constructor overrides key=value")
    train.add_argument(
        "--labelled-cases", type=int, help="use labels of only this many training cases (semi-supervised)"
    )
    train.add_argument("--recipe", nargs="*", default=[], help="recipe options key=value (e.g. stage1_fraction=0.2)")
    train.add_argument(
        "--init-encoder",
        metavar="MODEL",
        help="start the ResNet trunk from this trained model's trunk (id or folder; same width and depth, "
        "e.g. a BA-Net model for ConDSeg with --config encoder_width=24)",
    )
    train.add_argument(
        "--init-weights",
        metavar="MODEL",
        help="start from this trained model's weights (id or folder): the whole network for a model of the "
        "same network and configuration, HiDiff's segmentor for a model of its segmentor's network",
    )
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    ft = commands.add_parser("finetune", help="semi-supervised finetuning of a model on your labelled cases")
    ft.add_argument("-m", "--model", required=True, help="the parent model (id or folder); it is never changed")
    ft.add_argument(
        "--labelled", required=True, help="images/ + labels/ folder, .h5 folder, or list file (image,label)"
    )
    ft.add_argument("--unlabelled", help="folder of images or list file (image per line)")
    ft.add_argument("--iterations", type=int, default=200, help="training iterations")
    ft.add_argument("--batch-size", type=int, help="images or patches per iteration (default: the parent's recipe's)")
    ft.add_argument("--lr", type=float, help="learning rate (default: 3%% of the recipe's, same optimiser)")
    ft.add_argument("--held-out", type=int, help="labelled cases kept for before/after Dice (default 20%%, >= 1)")
    ft.add_argument("--resample", action="store_true", help="resample labels on another grid of the same region")
    ft.add_argument("-o", "--output", help="model folder (default: the user model folder); registered either way")
    ft.add_argument("--id", help="new model id (default <parent>-ft-<n>)")
    ft.add_argument("--resume", action="store_true", help="continue the newest unfinished finetuning of this parent")
    ft.add_argument("--device", default="auto", help=DEVICE_HELP)
    ft.add_argument("--seed", type=int, default=0, help="same seed, same split and same run")
    ft.add_argument(
        "--keep-if-worse",
        action="store_true",
        help="select the new model even when it is not better than its parent on the held-back cases",
    )
    ft.add_argument("--h5-spacing", help="voxel spacing x,y,z mm of HDF5 data (default 1,1,1)")
    ft.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(func=_cmd_finetune)

    demo = commands.add_parser("demo", help="segment the bundled sample, write an overlay PNG and report Dice")
    demo.add_argument("-o", "--output", default="medsegsuite-demo", help="folder for the results")
    demo.add_argument(
        "-m", "--model", default="hippocampus-dnet-lite", help="a 3D model for the sample (an MRI volume)"
    )
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.set_defaults(func=_cmd_demo)

    ev = commands.add_parser("evaluate", help="Dice, IoU and HD95 of predictions, or of a model on labelled cases")
    ev.add_argument("folders", nargs="*", metavar="PRED_DIR GT_DIR", help="predicted and reference label maps")
    ev.add_argument("-m", "--model", help="evaluate this model (id or folder) on --data")
    ev.add_argument("--data", help="labelled cases for --model (images/ + labels/, .h5 folder or list file)")
    ev.add_argument("--ids", help="file listing the case ids to use (e.g. a card's validation ids)")
    ev.add_argument("--labels", help="label values to score, e.g. 1,2 (default: those in the references)")
    ev.add_argument("--json", help="also write the per-case and mean metrics as JSON here")
    ev.add_argument("--save-predictions", help="with --model: write each case's labels into this folder")
    ev.add_argument("--device", default="auto", help=DEVICE_HELP)
    ev.add_argument("--fast", action="store_true", help="the model's quicker 3D settings")
    ev.add_argument("--h5-spacing", help="voxel spacing x,y,z mm of HDF5 data (default 1,1,1)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json file or saved predictions")
    ev.add_argument("-q", "--quiet", action="store_true", help="only the mean line")
    ev.set_defaults(func=_cmd_evaluate)

    ex = commands.add_parser(
        "export",
        help="write a segmentation as Slicer .seg.nrrd, a label map + JSON label table, or DICOM SEG",
        description="The output format follows OUTPUT's extension: .seg.nrrd (Slicer segmentation, overlaps kept in "
        "layers), .nii.gz/.nii/.nrrd (label map on the reference grid + NAME.labels.json: value, name, colour, "
        "terminology), .dcm (DICOM SEG referencing --dicom-series). A label map holds one label per voxel: "
        "overlapping segments are refused unless --overlap first|last says which one wins.",
    )
    ex.add_argument("segmentation", help="label map (.nrrd, .nii.gz, .nii, .mha, .png), Slicer .seg.nrrd or DICOM SEG")
    ex.add_argument("-o", "--output", required=True, help="file to write: .seg.nrrd, .nii.gz, .nii, .nrrd or .dcm")
    ex.add_argument("--reference", help="volume (file or DICOM folder) whose grid the segmentation must be on")
    ex.add_argument("--labels", help="label table: a model id (its card's labels) or a label table .json")
    ex.add_argument("--dicom-series", help="source DICOM series folder the DICOM SEG references (needed for .dcm)")
    ex.add_argument("--series-uid", help="DICOM series to use when the folder holds several")
    ex.add_argument(
        "--overlap",
        choices=("refuse", "first", "last"),
        default="refuse",
        help="label maps only: refuse overlapping segments (default), or let the first / last listed one win",
    )
    ex.add_argument(
        "--resample",
        action="store_true",
        help="resample (nearest neighbour) a segmentation on another grid covering the same region onto the reference",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ex.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    ex.set_defaults(func=_cmd_export)
    return parser


_GLOBAL_FLAGS = ("-v", "--verbose", "--debug")


def _global_flags_first(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``-v``/``--verbose``/``--debug`` moved before the sub-command, so they work on
    either side of it (arguments after ``--`` are left alone)."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in _GLOBAL_FLAGS]
    return flags + [a for a in argv[:end] if a not in _GLOBAL_FLAGS] + argv[end:]


def _os_error_message(error: OSError) -> str:
    """One line for an OSError that reached the top: what failed, where, and what to do."""
    import os

    reason = error.strerror or str(error) or type(error).__name__
    where = error.filename
    home = os.environ.get("MEDSEGSUITE_HOME")
    if home and where is not None and str(where).startswith(home):
        return f"{reason}: {where}; MEDSEGSUITE_HOME={home} must be a folder you can write to: point it at one"
    if where is not None:
        return f"{reason}: {where}; check the path, its permissions and the free disk space"
    return f"{reason}; check the paths, their permissions and the free disk space"


def _quiet_stdout() -> None:
    """Point stdout at /dev/null after the reader of a pipe went away (no error at exit)."""
    import os

    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_global_flags_first(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    func: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `medsegsuite ... | head`: the reader has all it wanted
        _quiet_stdout()
        return 141
    except MedSegSuiteError as error:
        if args.debug:
            raise
        print(f"medsegsuite: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medsegsuite: interrupted; nothing was written", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print(
            "medsegsuite: error: ran out of memory; nothing was written: use a smaller image or ROI, a smaller "
            "--batch-size, or a machine with more memory",
            file=sys.stderr,
        )
        return 2
    except OSError as error:  # the file system or environment: a missing, read-only or full place
        if args.debug:
            raise
        print(f"medsegsuite: error: {_os_error_message(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # last resort: one line, details with --debug
        if args.debug:
            raise
        print(
            f"medsegsuite: unexpected {type(error).__name__}: {error} (run with --debug for details)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
