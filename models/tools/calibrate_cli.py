"""``genserve calibrate``: outlier thresholds from held-out in-distribution data, written into
model.json (the scoring itself is models/tools/score_sets.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from models.scoring.colour import DEFAULT_MAX_FRACTION, DEFAULT_TOLERANCE
from models.scoring.extent import DEFAULT_TOLERANCE as EXTENT_TOLERANCE
from models.scoring.peak import DEFAULT_TOLERANCE as PEAK_TOLERANCE


def device_name(name: str) -> str:
    """A command's --device: "auto" is cuda where a GPU is, else cpu."""
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def add_calibrate(sub: Any) -> None:
    """``genserve calibrate``: outlier thresholds written into model.json."""
    c = sub.add_parser(
        "calibrate",
        help="outlier thresholds from held-out in-distribution data, written into model.json",
        description="Score the validation split with every score type, store each score's quantiles and the "
        "threshold for the target false-positive rate in the checkpoint's calibration (weights untouched).",
    )
    c.add_argument("--model", required=True, help="checkpoint folder (its background/ companion is used too)")
    add_data_options(c)
    c.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    c.add_argument(
        "--confidence",
        type=float,
        default=0.0,
        help="pick each threshold so that its false-positive rate is at most --fpr with this probability over the "
        "draw of the calibration images, a higher threshold (e.g. 0.9); default 0: the conformal threshold, whose "
        "rate is --fpr on average",
    )
    c.add_argument(
        "--neighbours",
        type=int,
        default=None,
        help="dose: judge an image by the mean distance of its statistics to those of this many nearest validation "
        "images (a nearest-neighbour density, calibrated leave-one-out; default 5); 0: the Mahalanobis distance "
        "from their mean",
    )
    c.add_argument(
        "--folds",
        type=int,
        default=0,
        help="dose with --neighbours 0 (implied when --neighbours is not given): cross-fit over this many "
        "folds, every image scored by a fit on the others, the threshold from all of them and the served fit on "
        "all (default 0: fit on a random half, threshold from the other)",
    )
    c.add_argument("--default", help="default score type (default: complexity, the evaluation's choice)")
    c.add_argument("--vae-k", type=int, help="IWAE samples behind a VAE's scores (default 1)")
    c.add_argument(
        "--keep",
        action="append",
        metavar="SCORE",
        help="keep this score type's entry from the current calibration (same weights) instead of recomputing it",
    )
    c.add_argument("--statistics", help="comma list of the statistics dose combines (default: all the model gives)")
    c.add_argument(
        "--companion",
        metavar="CHECKPOINT",
        help="copy this checkpoint (a VAE of the same data) into the model's companion/ first, so that dose can "
        "combine its statistics (companion_*)",
    )
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--device", default="auto")
    c.add_argument("--cache", default="runs/ood-cache", help="model-output cache folder ('' for none)")
    c.add_argument("--dry-run", action="store_true", help="print the calibration, do not write it")
    c.add_argument("--no-progress", action="store_true")
    add_colour_options(c)
    c.set_defaults(func=calibrate_command)


def add_data_options(c: Any) -> None:
    """calibrate's options for the images it calibrates on."""
    c.add_argument("--data", help="held-out in-distribution data (default: the training data set's valid split)")
    c.add_argument("--limit", type=int, help="calibrate on a seeded random subset of this many images")
    c.add_argument(
        "--reencode",
        action="store_true",
        help="calibrate on the images re-encoded as a pipeline may send them (a third each kept exact, saved as "
        "JPEG at quality 70-95, upscaled 2-4x), each decoded as /score decodes an upload, so that re-encoded "
        "in-distribution images pass the gate (models/tools/reencode.py)",
    )


def add_colour_options(c: Any) -> None:
    """calibrate's options for the colour check of a grayscale model's uploads (models/scoring/colour.py)."""
    c.add_argument(
        "--colour-tolerance",
        type=int,
        default=DEFAULT_TOLERANCE,
        help="one-channel models: chroma max(R,G,B) - min(R,G,B), in 8-bit levels, above which an uploaded "
        f"pixel counts as coloured (default {DEFAULT_TOLERANCE})",
    )
    c.add_argument(
        "--colour-max-fraction",
        type=float,
        default=DEFAULT_MAX_FRACTION,
        help="one-channel models: refuse an upload when more than this fraction of its pixels are coloured "
        f"(default {DEFAULT_MAX_FRACTION})",
    )
    c.add_argument("--no-colour-check", action="store_true", help="one-channel models: do not refuse uploads in colour")
    c.add_argument(
        "--peak-tolerance",
        type=int,
        default=PEAK_TOLERANCE,
        help="refuse an image whose brightest pixel is more than this many 8-bit levels below the dimmest "
        f"brightest-pixel among the calibration images (default {PEAK_TOLERANCE}; models/scoring/peak.py)",
    )
    c.add_argument("--no-peak-check", action="store_true", help="do not refuse images for their brightest pixel")
    c.add_argument(
        "--extent-tolerance",
        type=int,
        default=EXTENT_TOLERANCE,
        help="refuse an image whose object spans more than this many pixels less of the frame than the least-"
        f"spanning calibration image (default {EXTENT_TOLERANCE}; models/scoring/extent.py)",
    )
    c.add_argument("--no-extent-check", action="store_true", help="do not refuse images for how little they span")
    c.add_argument(
        "--checks-only",
        action="store_true",
        help="rewrite only the upload checks (colour, peak, extent) of the current calibration, from the same data, "
        "without scoring anything again",
    )


def calibrate_command(args: argparse.Namespace) -> int:
    from models.checkpoint import update_metadata
    from models.scoring.dose import DEFAULT_NEIGHBOURS
    from models.scoring.scorer import load_scorer
    from models.tools.ood_eval import load_eval_set
    from models.tools.score_sets import calibrate, upload_checks

    if args.checks_only and (args.companion or args.keep):
        raise ValueError("--checks-only scores nothing, so it takes neither --companion nor --keep")
    if args.companion:
        from models.tools.companion import install_companion

        install_companion(args.companion, args.model)
    scorer, meta = load_scorer(args.model, device_name(args.device), vae_score_k=args.vae_k)
    spec = args.data or f"{(meta.get('dataset') or {}).get('name') or ''}:valid"
    if spec.startswith(":"):
        raise ValueError(f"{args.model} does not name a named training data set; pass --data (its validation split)")
    if spec.endswith(":test"):
        raise ValueError(f"calibrate on held-out validation data, never the test set ({spec}); e.g. NAME:valid")
    data = load_eval_set(spec, shape=scorer.model.shape, levels=scorer.model.levels, limit=args.limit)
    if args.reencode:
        from models.tools.reencode import reencode

        data.images = reencode(data.images, scorer.model.levels)
        spec = f"{spec}, re-encoded (a third each exact, JPEG quality 70-95, upscaled 2-4x: --reencode)"
    colour, peak_tolerance, extent_tolerance = check_options(args)
    if args.checks_only:
        checks = upload_checks(scorer, data.images, colour, peak_tolerance, extent_tolerance)
        return rewrite_checks(args, meta, checks, spec, len(data))
    keep = kept_entries(meta, args.keep or [])
    # --folds cross-fits the Mahalanobis combination: given alone it means --neighbours 0 (as before)
    neighbours = args.neighbours if args.neighbours is not None else (0 if args.folds else DEFAULT_NEIGHBOURS)
    cal = calibrate(
        scorer,
        data.images,
        None,  # a conditional model is calibrated on p(x) = sum_y p(x|y) p(y)
        data_spec=spec,
        fpr=args.fpr,
        default=args.default,
        batch_size=args.batch_size,
        cache_dir=args.cache or None,
        show_progress=not args.no_progress,
        keep=keep,
        statistics=args.statistics.split(",") if args.statistics else None,
        confidence=args.confidence or None,
        folds=args.folds,
        neighbours=neighbours,
        colour=colour,
        peak_tolerance=peak_tolerance,
        extent_tolerance=extent_tolerance,
    )
    cal["command"] = args.command_line
    summary = {n: {k: v for k, v in e.items() if k != "quantiles"} for n, e in cal["scores"].items()}
    print(json.dumps({**cal, "scores": summary}, indent=2))  # noqa: T201 - the command's output
    if not args.dry_run:  # one atomic write replacing (not merging into) the old calibration
        update_metadata(args.model, merge=False, calibration=cal)
    return 0


def check_options(args: argparse.Namespace) -> tuple[Any, int | None, int | None]:
    """The upload checks asked for: the colour check (or None), the peak and the extent check's tolerances
    (None: no such check)."""
    from models.scoring.colour import ColourCheck

    colour = None if args.no_colour_check else ColourCheck(args.colour_tolerance, args.colour_max_fraction)
    peak_tolerance = None if args.no_peak_check else args.peak_tolerance
    return colour, peak_tolerance, None if args.no_extent_check else args.extent_tolerance


def kept_entries(meta: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """``--keep``: score entries copied from the current calibration, each saying where it came from."""
    previous = (meta.get("calibration") or {}).get("scores") or {}
    keep = {}
    for name in names:
        if name not in previous:
            raise ValueError(f"--keep {name}: the current calibration has no '{name}' entry to keep")
        old = meta["calibration"]
        source = previous[name].get("kept_from") or f"an earlier calibration on {old.get('data')} (n={old.get('n')})"
        keep[name] = {**previous[name], "kept_from": source}  # kept twice: still from where it was calibrated
        if name == "complexity_guarded":  # its threshold holds with the floor it was calibrated with
            keep[name]["nll_cap"] = old.get("nll_cap")
    return keep


def rewrite_checks(args: argparse.Namespace, meta: dict[str, Any], checks: dict[str, Any], spec: str, n: int) -> int:
    """``--checks-only``: the current calibration with its colour, peak and extent entries replaced by ``checks``,
    fitted on the ``n`` images of ``spec``, which must be the data it was calibrated on; its scores
    untouched."""
    from models.checkpoint import update_metadata

    cal = dict(meta.get("calibration") or {})
    if not cal.get("scores"):
        raise ValueError(f"--checks-only: {args.model} has no calibration to add checks to; run genserve calibrate")
    if (cal.get("data"), cal.get("n")) != (spec, n):
        raise ValueError(
            f"--checks-only: the calibration is of {cal.get('n')} images of {cal.get('data')}, not {n} of {spec}; "
            "pass the same --data, --limit and --reencode"
        )
    for name in ("colour", "peak", "extent"):
        cal.pop(name, None)
    cal.update(checks)
    cal["checks_command"] = args.command_line
    print(json.dumps(checks, indent=2))  # noqa: T201 - the command's output
    if not args.dry_run:
        update_metadata(args.model, merge=False, calibration=cal)
    return 0
