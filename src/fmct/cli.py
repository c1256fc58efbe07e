"""``fmct <verb>``: parse the command line, then call the library. Exit 0 done, 1 failure, 2 usage/config error."""

from __future__ import annotations

import argparse
import sys

from fmct.config import ConfigError


class UsageError(Exception):
    """A bad command line or input path, reported in one line with exit status 2."""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. canonical.spacing_mm=1.0")


# ------------------------------------------------------------------------------------------- ingest
def _ingest_parser(sub) -> None:
    parser = sub.add_parser("ingest", help="DICOM folders / NIfTI files -> canonical HU store")
    parser.add_argument("sources", nargs="+", metavar="SRC", help="folders of DICOM files and/or NIfTI files")
    parser.add_argument("--out", required=True, help="store folder (created or resumed)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading scans")
    parser.add_argument("--retry-failed", action="store_true", help="retry inputs skipped by an earlier run")
    _add_config_args(parser)
    parser.set_defaults(run=_ingest_run)


def _ingest_run(args) -> int:
    from fmct.config import IngestConfig, load_config
    from fmct.store import ingest

    config = load_config(IngestConfig, args.config, args.overrides)
    summary = ingest(args.sources, args.out, config, workers=args.workers, retry_failed=args.retry_failed)
    print(summary.describe())
    return 0 if summary.ok else 1


PARSERS = [_ingest_parser]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fmct", description="Self-supervised 3D foundation model for head CT.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in PARSERS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, UsageError) as error:
        print(f"fmct {args.verb}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmct {args.verb}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
