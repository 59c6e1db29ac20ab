"""The offline subcommands of ``genserve``: train, eval, calibrate, eval-ood, eval-classify, probe,
build-upload-suite (``genserve --help``). ``serve`` is the service's own (service/cli.py), which
builds the whole command from :func:`build_parser` and starts it with :func:`main`; the tools
themselves import no web code, so ``python -m models.tools.cli`` runs them without the service."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from models.files import DiskFullError
from models.image_convert import FITS
from models.tools.calibrate_cli import add_calibrate, device_name


def _train(args: argparse.Namespace) -> int:
    from models.tools.train import TrainConfig, train

    cfg: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    for key in ("data", "out", "epochs", "batch_size", "lr", "seed", "max_minutes", "device", "ema", "perturb"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    for item in args.set or []:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = value
    if args.no_progress:
        cfg["progress"] = False
    result = train(TrainConfig.from_dict(cfg))
    logging.getLogger("genserve").info("done: %s", json.dumps(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import load_checkpoint, update_metadata
    from models.tools.data import load_dataset
    from models.tools.evaluate import evaluate

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(args.model, device)
    if args.iwae_k and hasattr(model.config, "iwae_samples"):
        model.config.iwae_samples = args.iwae_k
    report = evaluate(
        model,
        load_dataset(args.data),
        batch_size=args.batch_size,
        show_progress=not args.no_progress,
        partial_dir=args.partial or None,
    )
    report["model"] = str(args.model)
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201 - the command's output
    if args.report:
        Path(args.report).write_text(text + "\n")
    if args.update_metadata:
        metrics = {
            "test_bits_per_dim": report["bits_per_dim"],
            "test_nats_per_image": report["nats_per_image"],
            "test_data": report["data"],
        }
        if "elbo_bits_per_dim" in report:
            metrics["test_elbo_bits_per_dim"] = report["elbo_bits_per_dim"]
            metrics["test_estimator"] = report["estimator"]
            metrics["test_kl_nats_per_image"] = report["kl_nats_per_image"]
        update_metadata(args.model, metrics=metrics)
    return 0


def _eval_ood(args: argparse.Namespace) -> int:
    from models.tools.ood_eval import run

    report = run(
        args.model,
        args.in_spec,
        args.out_specs,
        report_dir=args.report_dir,
        name=args.name,
        device=device_name(args.device),
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        cache_dir=args.cache or None,
        command=args.command_line,
        show_progress=not args.no_progress,
        examples=args.examples,
        suite=args.suite,
        score_types=args.scores.split(",") if args.scores else None,
        fit=args.fit,
    )
    table = {spec: {n: round(m["auroc"], 4) for n, m in o["scores"].items()} for spec, o in report["out"].items()}
    print(json.dumps({"auroc": table, "in": report["in"]["scores"]}, indent=2))  # noqa: T201
    return 0


def _eval_classify(args: argparse.Namespace) -> int:
    from models.tools.classify_eval import run

    report = run(
        args.model,
        args.in_spec,
        args.out_specs or [],
        report=args.report,
        device=device_name(args.device),
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        cache_dir=args.cache or None,
        command=args.command_line,
        show_progress=not args.no_progress,
    )
    summary = {"in": {k: v for k, v in report["in"].items() if k not in ("confusion", "per_class_accuracy")}}
    summary["out"] = report["out"]
    print(json.dumps(summary, indent=2))  # noqa: T201 - the command's output
    return 0


def _probe(args: argparse.Namespace) -> int:
    from models.tools.probe import run

    report = run(
        args.model,
        train_spec=args.train,
        test_spec=args.test,
        features=args.features,
        l2=args.l2,
        device=device_name(args.device),
        batch_size=args.batch_size,
        command=args.command_line,
    )
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201 - the command's output
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(text + "\n")
    return 0


def _add_train(sub: Any) -> None:
    """``genserve train``: its flags override the JSON config."""
    t = sub.add_parser("train", help="train a model (resumes if --out holds a resume state)")
    t.add_argument("--config", help="JSON training config (see configs/)")
    t.add_argument("--data", help="dataset spec, e.g. fashion-mnist or npz:PATH")
    t.add_argument("--out", help="output folder (checkpoint, resume state, log)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--max-minutes", type=float, help="time budget; the LR schedule follows it")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--ema", type=float)
    t.add_argument("--perturb", type=float, help="background-model input perturbation rate (Ren et al.)")
    t.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. model.hidden=32"
    )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)


def _add_eval(sub: Any) -> None:
    """``genserve eval``: NLL of a checkpoint on a dataset."""
    e = sub.add_parser("eval", help="NLL of a checkpoint on a dataset (bits/dim, nats/image)")
    e.add_argument("--model", required=True, help="checkpoint folder")
    e.add_argument("--data", default="fashion-mnist:test")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--iwae-k", type=int, help="importance samples for a VAE (default: the model's)")
    e.add_argument("--device", default="auto")
    e.add_argument("--report", help="write the JSON report here too")
    e.add_argument("--update-metadata", action="store_true", help="record the result as the checkpoint's test metrics")
    e.add_argument(
        "--partial",
        default="runs/eval-partial",
        help="keep per-image results here as they come and resume a stopped run from them ('' for none)",
    )
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_eval)


def _add_set_options(p: Any, *, batch_size: int) -> None:
    """The options eval-ood and eval-classify share: subsets, seed, batch, device, cache, progress."""
    p.add_argument("--limit", type=int, help="at most this many images per set (a seeded random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic sets and subsets")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default="runs/ood-cache", help="model-output cache folder ('' for none)")
    p.add_argument("--no-progress", action="store_true")


def _add_eval_ood(sub: Any) -> None:
    """``genserve eval-ood``: outlier detection against out-of-distribution sets."""
    o = sub.add_parser(
        "eval-ood",
        help="AUROC, AUPRC, FPR@95%%TPR of every score type; observed FPR at the calibrated threshold",
        description="Evaluate outlier detection: in-distribution test data against out-of-distribution sets. "
        "Sets: any data spec (a named set without split means :test), noise:uniform[:N], constant[:N], "
        "flip:SPEC (upside down).",
    )
    o.add_argument("--model", required=True, help="checkpoint folder")
    o.add_argument("--in", dest="in_spec", default="fashion-mnist:test", help="in-distribution test data")
    o.add_argument(
        "--out", dest="out_specs", action="append", default=[], metavar="SPEC", help="an out-of-distribution set"
    )
    o.add_argument(
        "--suite", help="a real-upload suite folder (one subfolder per kind): every file, as /score reads it"
    )
    o.add_argument(
        "--fit", choices=FITS, default="pad", help="how files of another aspect ratio are sized, as /score's `fit`"
    )
    o.add_argument("--scores", help="comma-separated score types to evaluate (default: all the model offers)")
    o.add_argument("--report-dir", default="docs/ood", help="where NAME.json, NAME.md and the PNG plots go")
    o.add_argument("--name", help="report file name stem (default: the model folder's name)")
    o.add_argument("--examples", type=int, default=4, help="images per set in the heatmap figure (0: none)")
    _add_set_options(o, batch_size=128)
    o.set_defaults(func=_eval_ood)


def _add_eval_classify(sub: Any) -> None:
    """``genserve eval-classify``: Bayes'-rule classification with refusals."""
    k = sub.add_parser(
        "eval-classify",
        help="accuracy of Bayes'-rule classification and the share refused, in and out of distribution",
        description="Classify labelled test images by p(y|x) with a calibrated class-conditional model; refuse "
        "those whose p(x) fails the calibrated outlier test; report accuracy and refusal rates (out-of-"
        "distribution sets as in eval-ood).",
    )
    k.add_argument("--model", required=True, help="calibrated class-conditional checkpoint folder")
    k.add_argument("--in", dest="in_spec", default="fashion-mnist:test", help="labelled in-distribution test data")
    k.add_argument("--out", dest="out_specs", action="append", metavar="SPEC", help="an out-of-distribution set")
    k.add_argument("--report", help="write the JSON report here and a markdown table beside it (.md)")
    _add_set_options(k, batch_size=64)
    k.set_defaults(func=_eval_classify)


def _add_probe(sub: Any) -> None:
    """``genserve probe``: linear probe on a VAE's latent features."""
    p = sub.add_parser(
        "probe",
        help="linear-probe accuracy of a VAE's latent features (logistic regression, train -> test)",
        description="Encode the training and test images with the VAE's encoder q(z|x), fit a multinomial "
        "logistic regression on the training features and report its accuracy on the test features.",
    )
    p.add_argument("--model", required=True, help="VAE checkpoint folder")
    p.add_argument("--train", default="fashion-mnist:train-full", help="labelled data to fit on")
    p.add_argument("--test", default="fashion-mnist:test", help="labelled data to report on")
    p.add_argument("--features", choices=["mean", "mean+std"], default="mean", help="latent mean, or mean and std")
    p.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights (per training image)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--report", help="write the JSON report here too")
    p.set_defaults(func=_probe)


def _build_upload_suite(args: argparse.Namespace) -> int:
    from models.tools.upload_suite import build

    build(args.out, args.kind)
    return 0


def _add_build_upload_suite(sub: Any) -> None:
    from models.tools.upload_suite import KINDS

    p = sub.add_parser(
        "build-upload-suite",
        help="build the real-upload evaluation suite (photos, icons, documents, ...) from installed packages",
    )
    p.add_argument("--out", default="data/upload-suite", help="folder to write (one subfolder per kind)")
    p.add_argument("--kind", action="append", choices=KINDS, help="build only this kind (repeatable)")
    p.set_defaults(func=_build_upload_suite)


Command = Callable[[Any], None]  # adds one subcommand to genserve's subparsers


def build_parser(extra: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The genserve parser: the offline subcommands, and ``extra`` ones (the service adds ``serve``)."""
    parser = argparse.ArgumentParser(prog="genserve", description="Serve and train generative image models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    add_calibrate(sub)
    _add_eval_ood(sub)
    _add_eval_classify(sub)
    _add_probe(sub)
    _add_build_upload_suite(sub)
    for add in extra:
        add(sub)
    return parser


def main(argv: list[str] | None = None, extra: Sequence[Command] = ()) -> int:
    args = build_parser(extra).parse_args(argv)
    args.command_line = " ".join(["genserve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        logging.getLogger("genserve").error("%s", e)
        return 2
    except DiskFullError as e:  # the files it would have replaced are unchanged (models/files.py)
        logging.getLogger("genserve").error("%s: free some space and run it again", e.strerror)
        return 3


if __name__ == "__main__":
    sys.exit(main())
