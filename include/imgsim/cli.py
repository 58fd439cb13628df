"""The ``imgsim`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from imgsim.config import ConfigError, Settings


def cmd_env(args: argparse.Namespace) -> int:
    from imgsim.envsetup import embedded_environment, shell_exports

    print(shell_exports(embedded_environment()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imgsim.demo import run_demo
    from imgsim.envsetup import embedded_environment

    return run_demo(embedded_environment(), args.date)


def cmd_summary(args: argparse.Namespace) -> int:
    from imgsim.demo import summary

    print(summary(Settings.from_env().data_root))
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from imgsim.models import current_version, published_versions, read_manifest

    layout = Settings.from_env().layout
    versions = published_versions(layout)
    if not versions:
        print(f"no published versions under {layout.models}")
        return 0
    current = current_version(layout)
    print(f"{'':2}{'version':<26}{'created (UTC)':<21}{'images':>8}  {'backbone':<20}"
          f"{'tables':>7}{'bucket':>8}{'recall@5':>10}")
    for v in reversed(versions):
        m = read_manifest(layout, v)
        print(f"{'*' if v == current else ' ':2}{v:<26}{m['created_at'][:19]:<21}"
              f"{m['counts']['indexed']:>8}  {m['backbone'].get('name', '?'):<20}"
              f"{m['lsh']['numHashTables']:>7}{m['lsh']['bucketLength']:>8}"
              f"{m['metrics']['recall_at_k']:>10.3f}")
    print("\n* = CURRENT")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from imgsim.models import rollback

    layout = Settings.from_env().layout
    rollback(layout, args.version)
    print(f"CURRENT -> {args.version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsim", description="imgsim: image similarity pipeline")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print the embedded default's environment as shell exports"
                   ).set_defaults(func=cmd_env)
    demo = sub.add_parser("demo", help="index a synthetic archive served on loopback, offline")
    demo.add_argument("--date", help="logical date of the run (default: today, UTC)")
    demo.set_defaults(func=cmd_demo)
    sub.add_parser("summary", help="summarise the current index").set_defaults(func=cmd_summary)
    sub.add_parser("versions", help="list published model versions").set_defaults(
        func=cmd_versions)
    rb = sub.add_parser("rollback", help="make an older published version current")
    rb.add_argument("version")
    rb.set_defaults(func=cmd_rollback)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, LookupError, ValueError, FileNotFoundError) as exc:
        print(f"imgsim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
