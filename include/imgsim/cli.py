"""The ``imgsim`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from imgsim.config import ConfigError, Settings
from imgsim.embedding.onnx_runtime import OnnxRuntimeError
from imgsim.errors import PermanentError
from imgsim.training.train import TrainingError
from imgsim.versions.models import VersionDamaged


def cmd_env(args: argparse.Namespace) -> int:
    from imgsim.envsetup import embedded_environment, shell_exports

    print(shell_exports(embedded_environment()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imgsim.demo import run_demo
    from imgsim.envsetup import embedded_environment

    return run_demo(embedded_environment(), args.date, verbose=args.verbose)


def cmd_summary(args: argparse.Namespace) -> int:
    from imgsim.demo import summary

    print(summary(Settings.from_env().data_root))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    """List the published versions, their files' state and CURRENT; 1 when something is wrong
    (CURRENT names no published version, or a version is damaged)."""
    from imgsim.ann.projection import describe as describe_projection
    from imgsim.embedding.trained import base_of, embedder_of
    from imgsim.versions.models import (
        check_version,
        current_version,
        describe_lsh,
        published_versions,
        read_manifest,
    )

    layout = Settings.from_env().layout
    versions = published_versions(layout)
    current = current_version(layout)
    damaged: list[str] = []
    if not versions:
        print(f"no published versions under {layout.models}")
    else:
        print(
            f"{'':2}{'version':<26}{'created (UTC)':<21}{'images':>8}  {'backbone':<20}"
            f"{'embedder':<26}"
            f"{'search space':<22}{'LSH keys':<34}{'bucket':>9}{'recall@5':>10}  files"
        )
    for v in reversed(versions):
        integrity = check_version(layout, v, hashes=args.verify)
        try:
            m = read_manifest(layout, v)
            row = (
                f"{m['created_at'][:19]:<21}{m['counts']['indexed']:>8}  "
                f"{base_of(m['backbone'].get('name', '?')):<20}"
                f"{embedder_of(m['backbone'].get('name', '')):<26}"
                f"{describe_projection(m.get('projection')):<22}{describe_lsh(m['lsh']):<34}"
                f"{m['lsh']['bucketLength']:>9.4g}{m['metrics']['recall_at_k']:>10.3f}"
            )
        except (VersionDamaged, LookupError, KeyError, TypeError, ValueError) as exc:
            row = f"{'manifest unreadable: ' + str(exc)[:80]:<150}"
        print(f"{'*' if v == current else ' ':2}{v:<26}{row}  {integrity.status}")
        for problem in integrity.problems:
            print(f"{'':4}! {problem}")
        if integrity.problems:
            damaged.append(v)
    if versions:
        print(
            "\n* = CURRENT; files: sizes (with --verify also sha256) against those recorded "
            "at publish"
        )
    ok = not damaged
    if current is None:
        if versions:
            print(
                f"CURRENT is not set ({layout.current_pointer} is missing or empty); "
                "`imgsim rollback VERSION` sets it"
            )
            ok = False
    elif current not in versions:
        print(
            f"CURRENT names {current}, which is not a published version under {layout.models}"
            "; point it at one with `imgsim rollback VERSION`"
        )
        ok = False
    if damaged:
        print(
            f"damaged: {', '.join(damaged)}; `imgsim rollback VERSION` makes an intact "
            "version CURRENT"
        )
    return 0 if ok else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from imgsim.versions.embedders import current_embedder
    from imgsim.versions.models import rollback

    settings = Settings.from_env()
    layout = settings.layout
    rollback(layout, args.version, force=args.force, ttl_s=settings.lease_ttl_s)
    print(f"CURRENT -> {args.version} (embedder: {current_embedder(layout) or 'frozen'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the embedding on the data root's labelled references; publish it if it beats the
    frozen backbone + LDA on the held-out photos."""
    from imgsim.training.train import TrainConfig, run_training

    settings = Settings.from_env()
    config = TrainConfig.from_settings(
        settings, epochs=args.epochs, mode=args.mode, device=args.device
    )
    print(
        f"training {config.base} -> {config.dim}-d ({config.mode} mode, {config.epochs} epochs) "
        f"on the labelled references of {settings.data_root}"
    )

    def progress(point: dict[str, Any]) -> None:
        print(
            f"  epoch {point['epoch']}/{config.epochs}: loss {point['loss']:.3f}, held-out "
            f"hit@1 {point['held_hit_at_1']:.3f}, precision@5 {point['held_precision_at_5']:.3f}"
            f" ({point['seconds']:.0f} s)",
            flush=True,
        )

    result = run_training(settings, config, run_id="cli", progress=progress)
    m = result.metrics
    print(
        f"  held-out ({m['held_out']} photos) hit@1: frozen {m['frozen']['raw']['hit_at_1']:.3f}, "
        f"frozen + LDA {m['frozen']['lda'].get('hit_at_1', float('nan')):.3f}, trained "
        f"{m['trained']['raw']['hit_at_1']:.3f}, trained + LDA "
        f"{m['trained']['lda'].get('hit_at_1', float('nan')):.3f}"
    )
    print(f"{result.reason}")
    if result.published:
        print("next: the next imgsim_index run embeds every reference with it")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """Look images up in-process with the published model; print a table, write the sheet."""
    from datetime import UTC, datetime
    from pathlib import Path

    from imgsim.fsutil import sha256_file
    from imgsim.query.lookup import Answer, Searcher
    from imgsim.query.results import write_results

    settings = Settings.from_env()
    layout = settings.layout
    if not 1 <= args.k <= 100:
        raise ValueError(f"-k must be between 1 and 100, got {args.k}")
    searcher = Searcher.load(settings, args.version)
    model = searcher.model
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    found = searcher.search_files([p for p in paths if p.is_file()], args.k)
    stamp = datetime.now(UTC)
    run_id = f"cli-{stamp:%Y%m%dT%H%M%S%fZ}"
    queries: list[dict[str, Any]] = []
    for p in paths:
        key = str(p)
        entry: dict[str, Any] = {
            "query_name": p.name,
            "query_path": str(p.absolute()),
            "source": "cli",
            "query_id": sha256_file(p) if p.is_file() else None,
            "model_version": model.version,
            "neighbours": [],
            "note": None,
            "reason": None,
            "detail": None,
        }
        if key in missing:
            entry.update(status="rejected", reason="missing", detail=f"{p} is not a file")
        elif not isinstance(found[key], Answer):
            entry.update(status="rejected", reason=found[key].reason, detail=found[key].detail)
        else:
            entry.update(found[key].fields(args.k, searcher.indexed))
        queries.append(entry)
    results = {
        "run_id": run_id,
        "model_version": model.version,
        "k": args.k,
        "created_at": stamp.isoformat(),
        "engine": "local",
        "queries": queries,
    }
    out = Path(args.out) if args.out else layout.queries / "results" / run_id
    files = write_results(out, results, layout)
    print(
        f"model version {model.version} ({model.manifest['backbone']['name']}, "
        f"{len(model.ids)} reference images), k={args.k}"
    )
    for q in queries:
        print(f"\n{q['query_name']}")
        if q["status"] != "answered":
            print(f"  rejected: {q['reason']}: {q['detail']}")
            continue
        print(f"  {'rank':>4}  {'distance':>8}  {'class':<36} image")
        for n in q["neighbours"]:
            print(
                f"  {n['rank']:>4}  {n['distance']:>8.4f}  "
                f"{(n['class_name'] or '-')[:36]:<36} {n['path']}"
            )
        if q["note"]:
            print(f"  note: {q['note']}")
    print(f"\ncontact sheet: {files['contact_sheet']}\ngallery: {files['gallery_html']}")
    return 0 if all(q["status"] == "answered" for q in queries) else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from imgsim import evaluate as ev

    if args.sample:
        report = ev.evaluate_sample(
            Path(args.sample),
            Path(args.data_root),
            Path(args.out),
            seed=args.seed,
            query_share=args.query_share,
            k=args.k,
            backbone=args.backbone,
            train_epochs=args.train_epochs,
        )
    else:
        if not (args.images and args.labels):
            raise ValueError("give --images DIR and --labels CSV (or --sample DIR)")
        queries = ev.read_query_set(Path(args.images), Path(args.labels))
        report = ev.evaluate(Settings.from_env(), queries, version=args.version, k=args.k)
        ev.write_report(report, Path(args.out))
    k = report["k"]
    print(
        f"model {report['model_version']} ({report['backbone']}), "
        f"{report['reference_images']} references, {report['queries']} queries, k={k}"
    )
    print(
        f"  precision@{k}  LSH {report[f'precision_at_{k}']:.3f}   exact "
        f"{report[f'exact_precision_at_{k}']:.3f}   (chance {report['chance_precision']:.3f})"
    )
    print(
        f"  hit@{k}        LSH {report[f'hit_at_{k}']:.3f}   exact "
        f"{report[f'exact_hit_at_{k}']:.3f}"
    )
    print(
        f"  recall@{k} of the LSH against exact search: {report[f'recall_at_{k}_vs_exact']:.3f}"
        f", comparing {100 * report['candidates_share_mean']:.1f}% of the references per query"
    )
    proj = report["projection"]
    print(
        f"  search space: {proj['kind']} ({proj.get('dim')} -> {proj.get('dims')} dims): "
        f"{proj.get('reason') or 'no projection'}; query expansion {report['query_expansion']}"
    )
    if report.get("kinds"):
        print(
            "  side by side (P: label precision, recall: LSH against exact search in that "
            "space, compared: share of the index, QE: query expansion):"
        )
        print("\n".join(ev.table(report)))
    training = report.get("training")
    if training:
        print(f"  training: {training['reason']}")
    trained = report.get("trained")
    if trained:
        print(
            f"  frozen vs trained embedder ({trained['backbone']}), the same {trained['queries']}"
            " queries, as lookups answer:"
        )
        for name, r in (("frozen", report), ("trained", trained)):
            print(
                f"    {name:<8} {r['projection']['kind']:<6} precision@{k} "
                f"{r[f'precision_at_{k}']:.3f}  hit@1 {r['hit_at_1']:.3f}  hit@{k} "
                f"{r[f'hit_at_{k}']:.3f}"
            )
        print("\n".join(ev.table(trained)))
    print(f"  written: {Path(args.out) / 'evaluation.json'}, {Path(args.out) / 'evaluation.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsim", description="imgsim: image similarity pipeline")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "env", help="print the embedded default's environment as shell exports"
    ).set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="index a synthetic archive served on loopback, offline")
    demo.add_argument("--date", help="logical date of the run (default: today, UTC)")
    demo.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Airflow's and Spark's whole output (always written to the log "
        "file whose path is printed)",
    )
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("summary", help="summarise the current index").set_defaults(func=cmd_summary)
    ver = sub.add_parser("versions", help="list published model versions and check their files")
    ver.add_argument(
        "--verify", action="store_true", help="check every file's sha256 too, not only its size"
    )
    ver.set_defaults(func=cmd_versions)
    q = sub.add_parser("query", help="find the reference images most like IMAGE(s)")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("-k", type=int, default=5, help="neighbours per image (default 5)")
    q.add_argument("--version", help="model version (default: CURRENT)")
    q.add_argument(
        "--out",
        help="folder for the contact sheet and results (default: queries/results/cli-<time>/)",
    )
    q.set_defaults(func=cmd_query)
    ev = sub.add_parser("evaluate", help="precision/hit@k by label and recall@k vs exact search")
    ev.add_argument("--images", help="folder of labelled query images")
    ev.add_argument("--labels", help="CSV with Class and image columns for --images")
    ev.add_argument("--version", help="model version (default: CURRENT)")
    ev.add_argument(
        "--sample",
        help="instead: split this Stanford Cars sample folder (images/ + "
        "labels.csv) by --seed, index the reference part in "
        "--data-root and evaluate the rest",
    )
    ev.add_argument("--data-root", default="data/evaluate", help="scratch data root for --sample")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--query-share", type=float, default=0.2)
    ev.add_argument("--backbone", default="efficientnet_lite0")
    ev.add_argument("-k", type=int, default=5)
    ev.add_argument(
        "--train-epochs",
        type=int,
        help="with --sample: also train the embedding on the reference part for this many "
        "epochs, rebuild the index with it and report the trained rows beside the frozen ones",
    )
    ev.add_argument("--out", default="evaluation", help="folder for evaluation.json/.png")
    ev.set_defaults(func=cmd_evaluate)
    tr = sub.add_parser("train", help="train the embedding on the labelled references")
    tr.add_argument("--epochs", type=int, help="epochs (default IMGSIM_TRAIN_EPOCHS, 8)")
    tr.add_argument(
        "--mode", choices=("auto", "top", "full"), help="default IMGSIM_TRAIN_MODE (auto)"
    )
    tr.add_argument("--device", help="default IMGSIM_DEVICE (auto: cuda when available)")
    tr.set_defaults(func=cmd_train)
    rb = sub.add_parser("rollback", help="make another (intact) published version current")
    rb.add_argument("version")
    rb.add_argument(
        "--force",
        action="store_true",
        help="roll back even while an index run holds the lease (only if that run is dead)",
    )
    rb.set_defaults(func=cmd_rollback)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (
        PermanentError,  # imgsim.errors: a damaged version, a backbone mismatch, bad labels ...
        OnnxRuntimeError,
        ConfigError,
        LookupError,
        ValueError,
        FileNotFoundError,
        TrainingError,
    ) as exc:
        print(f"imgsim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
