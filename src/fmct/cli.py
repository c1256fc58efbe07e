"""``fmct <verb>``: parse the command line, then call the library. Exit 0 done, 1 failure, 2 usage/config error,
130 interrupted."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
import textwrap
from functools import cached_property, partial
from pathlib import Path

from fmct.demo import DEMO_SCALES
from fmct.errors import FmctError, UsageError
from fmct.log import configure as configure_logging
from fmct.log import logger

# A config override: a dotted key, "=", a value (a path never starts like this unless it has "=").
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")

_EXIT_STATUS = """\
exit status:
  0    done; a batch where some inputs were skipped still exits 0 and says where the reasons are
  1    failure
  2    usage or config error
  130  interrupted; run the same command again to resume

`fmct VERB --help` lists the options of VERB, each with its default and unit."""

_CONFIG_HELP = "YAML config file, or the name of one shipped in fmct/configs (default: none, the built-in defaults)"
_RENAME_HELP = "generic CSV column renaming, e.g. Hemorrhage=ich,PatientID=patient_id (default: none)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help where every option names its default, paragraphs wrap and indented lines (examples) keep theirs.

    An option whose argparse default is None leaves the value to the verb's config dataclass when its
    dest is a field there (``config``, "module:Class"): the default shown is read from that dataclass, so
    help and behaviour cannot drift apart. It is imported only when help is shown, as it may import torch.
    A help text that names its own default, "(default: ...)", is left as it is, as is a switch that is off
    unless given. A required option says "(required)".
    """

    def __init__(self, prog: str, config: str = "") -> None:
        super().__init__(prog)
        self.config = config

    @cached_property
    def _config_defaults(self) -> object | None:
        """The verb's config with its defaults, or None for a verb without one."""
        if not self.config:
            return None
        module, _, name = self.config.partition(":")
        return getattr(importlib.import_module(module), name)()

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default:" in help or action.default is False:
            return help
        if action.required and action.option_strings:
            return f"{help} (required)"
        if action.default is None:
            if not hasattr(self._config_defaults, action.dest):
                return help
            default = _spell(getattr(self._config_defaults, action.dest))
            return f"{help} (default: {default.replace('%', '%%')})"  # help is %-formatted next
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line
            if line.startswith(" ")
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines()
        )


def _spell(value: object) -> str:
    """A config value as the command line writes it: a list comma-separated, an empty one "none"."""
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return "none" if value == "" else str(value)


def _add_verb(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    example: str,
    about: str = "",
    config: str = "",
) -> argparse.ArgumentParser:
    """The parser of verb ``name``: ``summary`` in ``fmct --help``; atop ``fmct <name> --help``, ``about``
    (else the summary) and one example invocation. ``config``: "module:Class" of the verb's config dataclass."""
    return sub.add_parser(
        name,
        help=summary,
        description=f"{about or summary}\n\nexample:\n  {example}",
        formatter_class=partial(_HelpFormatter, config=config),
    )


def _add_config_args(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", help=_CONFIG_HELP)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"config overrides, dotted into nested sections, values parsed as YAML, e.g. {example}",
    )


def _add_bootstrap_args(parser: argparse.ArgumentParser, resamples_help: str) -> None:
    parser.add_argument("--bootstrap", type=int, default=1000, help=resamples_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def _check_bootstrap(args) -> None:
    if args.bootstrap < 1:
        raise UsageError(f"--bootstrap must be a positive number of resamples, got {args.bootstrap}")


def _check_out(out: str, kind: str = "folder") -> None:
    """``--out`` names a ``kind`` ("folder" or "file") to write: refuse, before any work, the other kind
    standing there, or a path under a file."""
    path = Path(out)
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file; name a folder")
    if kind == "file" and path.is_dir():
        raise UsageError(f"--out {out}: is a folder; name the file to write")


def _add_saliency_examples_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--saliency-examples",
        type=int,
        default=0,
        metavar="N",
        help="write saliency PNGs of the N highest-scoring true and false positives per finding and site group "
        "(OUT/saliency/, shown by fmct report)",
    )


def _add_budget_args(parser: argparse.ArgumentParser, verb: str) -> None:
    """The label budgets, seeds, held-out sites and findings shared by probe and finetune."""
    parser.add_argument(
        "--label-fractions", help="comma-separated shares (0 to 1) of the training labels, one budget each"
    )
    parser.add_argument(
        "--shots",
        help="comma-separated N, one budget each besides the fractions: N positive and N negative scans per finding",
    )
    parser.add_argument("--seeds", type=int, help="number of seeds per budget, each its own training subset")
    parser.add_argument(
        "--first-seed",
        type=int,
        help="the first seed (default 0): seeds split over runs, whose folders fmct evaluate reads together",
    )
    parser.add_argument("--ood-sites", help="comma-separated sites whose scans are test-only (out-of-distribution)")
    parser.add_argument("--findings", help=f"comma-separated findings to {verb} (default: all)")


# The comma-separated list flags of probe and finetune (``--label-fractions 0.1,1``), as config lists.
BUDGET_LISTS = ("label_fractions", "shots", "ood_sites", "findings")


def _flag_overrides(args: argparse.Namespace, lists: tuple[str, ...], scalars: tuple[str, ...]) -> list[str]:
    """The ``key=value`` overrides of the flags given (``None``: not given, the config decides): each of
    ``lists`` as ``key=[a,b]``, each of ``scalars`` as ``key=value``."""
    overrides = [f"{key}=[{getattr(args, key)}]" for key in lists if getattr(args, key) is not None]
    return overrides + [f"{key}={getattr(args, key)}" for key in scalars if getattr(args, key) is not None]


def _parse_rename(text: str | None) -> dict[str, str]:
    """``--rename Old=new,Other=other`` as a dict of column names (empty when not given)."""
    rename = {}
    for pair in (text or "").split(","):
        if pair.strip():
            old, sep, new = pair.partition("=")
            if not sep:
                raise UsageError(f"--rename {pair!r} is not OLD=new")
            rename[old.strip()] = new.strip()
    return rename


# ------------------------------------------------------------------------------------------- ingest
def _ingest_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "ingest",
        "DICOM folders / NIfTI files -> canonical HU store",
        "fmct ingest cohort/dicom scan.nii.gz --out store --workers 2 canonical.spacing_mm=1.0",
        about="DICOM folders / NIfTI files -> a store of canonical int16 HU volumes and its manifest. An input "
        "that cannot be used is skipped with a one-line reason; a re-run resumes, skipping scans already stored.",
    )
    parser.add_argument("--out", required=True, help="store folder (created or resumed)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading scans")
    parser.add_argument("--retry-failed", action="store_true", help="retry inputs skipped by an earlier run")
    parser.add_argument(
        "--key",
        metavar="FILE",
        help="pseudonym key file, kept outside the store and never shared (default: $FMCT_KEY_FILE, else "
        "~/.config/fmct/pseudonym.key, made on first use); its source map lies beside it",
    )
    parser.add_argument("--config", help=_CONFIG_HELP)
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="SRC|key=value",
        help="folders of DICOM files and/or NIfTI files, then config overrides, e.g. canonical.spacing_mm=1.0",
    )
    parser.set_defaults(run=_ingest_run)


def _ingest_run(args) -> int:
    from fmct.config import IngestConfig, load_config
    from fmct.ingest import ingest

    overrides = [item for item in args.inputs if _OVERRIDE.match(item)]
    sources = [item for item in args.inputs if not _OVERRIDE.match(item)]
    if not sources:
        raise UsageError("no SRC given")
    config = load_config(IngestConfig, args.config, overrides)
    summary = ingest(sources, args.out, config, workers=args.workers, retry_failed=args.retry_failed, key_file=args.key)
    print(summary.describe())
    return 0 if summary.ok else 1


# -------------------------------------------------------------------------------------------- store
def _store_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "store",
        "store upkeep: migrate to another codec, pack into streaming shards",
        "fmct store pack store --out shards --scans-per-shard 64",
        about="Upkeep of a store written by fmct ingest. `migrate` rewrites its volume files in another codec, in "
        "place, one scan at a time, checking each new file bit for bit before the old one is removed; "
        "`pack` writes WebDataset shards that `fmct pretrain --store SHARDS` streams. Both resume.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", help="what to do to the store")
    migrate = actions.add_parser(
        "migrate",
        help="rewrite the volume files in another codec, in place; resumes",
        description="Rewrite every volume file of STORE in CODEC, in place (a store of .npy files written before "
        "compression, or another codec). Atomic per scan; a re-run continues.",
        formatter_class=_HelpFormatter,
    )
    migrate.add_argument("store", metavar="STORE", help="store folder written by fmct ingest")
    migrate.add_argument("--codec", help="lz4hc, zstd, lz4 or npy (default: the store's store.codec, else lz4hc)")
    migrate.set_defaults(run=_store_migrate_run)
    pack = actions.add_parser(
        "pack",
        help="pack into WebDataset shards for streaming; resumes",
        description="Pack the scans of STORE into WebDataset shards plus an index, shards.json, in SHARDS, for "
        "`fmct pretrain --store SHARDS` (the shards may then be moved to object storage: data.shards_url).",
        formatter_class=_HelpFormatter,
    )
    pack.add_argument("store", metavar="STORE", help="store folder written by fmct ingest")
    pack.add_argument("--out", required=True, help="shard folder (created or resumed)")
    pack.add_argument(
        "--scans-per-shard", type=int, default=64, help="scans per shard (about 100 MiB at 128^3 in lz4hc)"
    )
    pack.add_argument("--codec", default="lz4hc", help="codec of the packed volumes: lz4hc, zstd or lz4")
    pack.set_defaults(run=_store_pack_run)


def _store_migrate_run(args) -> int:
    from fmct.store import migrate

    summary = migrate(args.store, args.codec)
    print(summary.describe())
    return 0 if summary.ok else 1


def _store_pack_run(args) -> int:
    from fmct.data.shards import pack_store

    summary = pack_store(args.store, args.out, scans_per_shard=args.scans_per_shard, codec=args.codec)
    print(summary.describe())
    return 0


# -------------------------------------------------------------------------------------------- probe
def _probe_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "probe",
        "per-finding probes on frozen embeddings -> predictions",
        "fmct probe --embeddings emb --labels cohort/labels.csv --store store --out probe "
        "--label-fractions 0.1,1 --ood-sites C",
        config="fmct.eval.probe:ProbeConfig",
    )
    parser.add_argument("--embeddings", required=True, help="embeddings folder written by fmct embed")
    parser.add_argument(
        "--labels",
        required=True,
        help="labels CSV (README: The labels file), or [cq500:|rsna:|generic:]FILE "
        "(CQ500 reads.csv, RSNA stage_2_train.csv)",
    )
    parser.add_argument("--out", required=True, help="predictions folder")
    parser.add_argument(
        "--store",
        help="store whose manifest maps `source` labels to scans and gives patient keys (default: none; the labels "
        "then need scan_id, and a scan without patient_id is its own patient)",
    )
    _add_budget_args(parser, "probe")
    _add_saliency_examples_arg(parser)
    parser.add_argument(
        "--features",
        choices=["auto", "cls", "patch_mean", "patch_max", "concat", "cls_mean_max", "first_order"],
        help="feature set of the table: cls (CLS token), patch_mean / patch_max (mean / max patch token), concat "
        "(cls | patch_mean), cls_mean_max (cls | patch_mean | patch_max), first_order (the HU histogram's); auto: "
        "per budget and seed, the one of cls, concat, cls_mean_max with the best mean validation AUROC "
        "(default: the table's own, auto for a backbone, first_order for hu-histogram)",
    )
    parser.add_argument(
        "--method",
        choices=["logistic", "knn"],
        help="logistic: L2-regularised logistic regression, C chosen by validation AUROC (c_grid); "
        "knn: cosine k nearest neighbours, k chosen by validation AUROC (knn_k)",
    )
    parser.add_argument("--model", help="model name in the predictions (default: from the embeddings)")
    parser.add_argument(
        "--arm",
        help="arm in the predictions, e.g. pretrained or scratch (default: the embeddings' arm, else pretrained)",
    )
    parser.add_argument("--rename", help=_RENAME_HELP)
    _add_config_args(parser, "c_grid=[0.01,0.1,1] val_fraction=0.2")
    parser.set_defaults(run=_probe_run)


def _probe_run(args) -> int:
    from pathlib import Path

    from fmct.config import load_config
    from fmct.eval.probe import ProbeConfig, run_probe

    overrides = _flag_overrides(args, BUDGET_LISTS, ("seeds", "first_seed", "features", "method", "model", "arm"))
    config = load_config(ProbeConfig, args.config, args.overrides + overrides)
    rename = _parse_rename(args.rename)
    summary = run_probe(
        args.embeddings,
        args.labels,
        args.out,
        config,
        store_path=args.store,
        rename=rename or None,
        saliency_examples=args.saliency_examples,
    )
    print(summary.describe(Path(args.out)))
    return 0 if summary.n_predictions else 1


# ----------------------------------------------------------------------------------------- evaluate
def _evaluate_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "evaluate",
        "predictions -> AUROC/AUPRC/sensitivity with bootstrap CIs, paired tests",
        "fmct evaluate --predictions probe finetune --out evaluation --bootstrap 2000",
    )
    parser.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="DIR",
        help="predictions folders written by fmct probe or finetune",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="folder for metrics.csv, comparisons.csv, operating_points.csv, calibration.csv, roc.csv, metrics.json",
    )
    _add_bootstrap_args(parser, "patient-level bootstrap resamples (of the scans' patients)")
    parser.set_defaults(run=_evaluate_run)


def _evaluate_run(args) -> int:
    from fmct.eval.evaluate import evaluate, write_evaluation

    _check_out(args.out)
    _check_bootstrap(args)
    evaluation = evaluate(args.predictions, n_bootstrap=args.bootstrap, seed=args.seed)
    write_evaluation(evaluation, args.out)
    print(f"evaluate: {len(evaluation.metrics)} metric rows, {len(evaluation.comparisons)} comparisons -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- report
def _report_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "report",
        "evaluation or predictions folders -> one self-contained HTML page",
        "fmct report evaluation --out report.html --pretraining run",
    )
    parser.add_argument(
        "folders", nargs="+", metavar="DIR", help="evaluation folders (metrics.json) or predictions folders"
    )
    parser.add_argument("--out", required=True, help="the HTML file to write (PNGs go to <name>_figures/ beside it)")
    parser.add_argument(
        "--pretraining",
        nargs="+",
        default=[],
        metavar="RUN|MODEL",
        help="pretraining runs, model folders or shipped model names whose log.jsonl to draw as learning "
        "curves (default: none)",
    )
    _add_bootstrap_args(parser, "bootstrap resamples when given predictions folders")
    parser.set_defaults(run=_report_run)


def _report_run(args) -> int:
    from fmct.eval.report import write_report

    _check_out(args.out, kind="file")
    figures = Path(args.out).with_name(Path(args.out).stem + "_figures")
    if figures.exists() and not figures.is_dir():
        raise UsageError(f"--out {args.out}: its figures folder {figures} is a file")
    _check_bootstrap(args)
    path = write_report(
        args.folders, args.out, n_bootstrap=args.bootstrap, seed=args.seed, pretraining=args.pretraining
    )
    print(f"report: {path}")
    return 0


# -------------------------------------------------------------------------------------------- synth
def _synth_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "synth",
        "synthetic head CT cohort with labelled findings -> DICOM/NIfTI + labels.csv",
        "fmct synth --out cohort --n 60 --sites A,B --format nifti --seed 1 --workers 2 --preview",
    )
    parser.add_argument("--out", required=True, help="output folder (created or resumed)")
    parser.add_argument("--n", type=int, default=200, help="number of cases (studies)")
    parser.add_argument("--sites", default="A,B,C", help="comma-separated site profiles; cases cycle through them")
    parser.add_argument(
        "--format",
        choices=["dicom", "nifti"],
        default="dicom",
        help="dicom: a DICOM series per case; nifti: a .nii.gz per case (the cq500 and rsna layouts are DICOM)",
    )
    parser.add_argument(
        "--layout",
        choices=["plain", "cq500", "rsna"],
        default="plain",
        help="plain: a folder or file per case and labels.csv; cq500: as the CQ500 release, with reads.csv; "
        "rsna: as the RSNA 2019 challenge, with stage_2_train.csv",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the cohort: case i is drawn from (seed, i), whatever --workers"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes generating cases")
    parser.add_argument("--matrix", type=int, default=512, help="pixels per image side (same field of view)")
    parser.add_argument("--preview", action="store_true", help="also write preview/<case>.png montages")
    parser.add_argument(
        "--split",
        default="0.7,0.1,0.2",
        help="train,val,test shares of labels.csv's split column, each case drawn from its own seed",
    )
    parser.set_defaults(run=_synth_run)


def _synth_run(args) -> int:
    from fmct.synth import generate_cohort, parse_sites

    _check_out(args.out)
    try:
        split_fractions = tuple(float(share) for share in args.split.split(","))
    except ValueError:
        raise UsageError(f"--split {args.split!r}: three numbers (train,val,test), e.g. 0.7,0.1,0.2") from None
    summary = generate_cohort(
        args.out,
        n=args.n,
        sites=parse_sites(args.sites),
        fmt=args.format,
        layout=args.layout,
        seed=args.seed,
        workers=args.workers,
        preview=args.preview,
        matrix=args.matrix,
        split_fractions=split_fractions,
    )
    print(summary.describe())
    return 0


# ----------------------------------------------------------------------------------------- pretrain
def _pretrain_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "pretrain",
        "self-supervised pretraining (DINO + iBOT, MAE or synthetic anomalies) on a store; resumes",
        "fmct pretrain --store store --out run --config pretrain_demo optim.epochs=20",
        about="Self-supervised pretraining (DINO + iBOT, MAE or synthetic anomalies) of a 3D ViT on the volumes of a "
        "store, no labels needed. The same command resumes from RUN's last checkpoint.",
    )
    parser.add_argument(
        "--store", required=True, help="store folder written by fmct ingest, or shard folder written by fmct store pack"
    )
    parser.add_argument("--out", required=True, help="run folder (resumed when it holds a checkpoint)")
    _add_config_args(parser, "optim.epochs=100 model.size=small")
    parser.set_defaults(run=_pretrain_run)


def _pretrain_run(args) -> int:
    from fmct.config import load_config
    from fmct.ssl.config import PretrainConfig
    from fmct.ssl.train import pretrain

    config = load_config(PretrainConfig, args.config, args.overrides)
    result = pretrain(args.store, args.out, config)
    if result["rank"] == 0:
        print(f"pretrain: {result['step']} of {result['total_steps']} steps -> {args.out}")
    return 0


def _release_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "release",
        "a finished pretraining run as a shippable model folder with its model card",
        'fmct release run --out src/fmct/weights/fmct-synth-tiny --name fmct-synth-tiny --data "800 synthetic heads" '
        '--command "make foundation"',
        about="Copy a finished pretraining run's backbone, log.jsonl and resolved recipe into a model folder and write "
        "its model card (method, data, budget, online evaluation). Absolute paths become bare names: the folder "
        "can leave the machine.",
    )
    parser.add_argument("run_dir", metavar="RUN", help="finished pretraining run folder")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--name", required=True, help="the model's name in its card")
    parser.add_argument("--data", required=True, help="what it was pretrained on (Markdown)")
    parser.add_argument("--command", required=True, help="the command that reproduces the run")
    parser.add_argument("--machine", default="a 2-core CPU (fp32)", help="where it was trained")
    parser.add_argument("--results", default="", help="what it was measured to do downstream (Markdown)")
    parser.set_defaults(run=_release_run)


def _release_run(args) -> int:
    from fmct.ssl.release import package

    print(package(Path(args.run_dir), Path(args.out), args.name, args.data, args.command, args.machine, args.results))
    return 0


# ------------------------------------------------------------------------------------------- embed
def _embed_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "embed",
        "features of every scan of a store: a backbone's (CLS, mean and max patch token) or a floor's; resumes",
        "fmct embed --model run --store store --out emb --batch-size 8",
        about="One row of features per scan of a store. RUN|DIR: a pretrained backbone's CLS token and the mean and "
        "max of its patch tokens (cls, patch_mean, patch_max; arm pretrained). The two floors every pretrained "
        "model must beat, probed like any embeddings: "
        "`--model scratch --like RUN` (the same architecture, randomly initialised and frozen; arm random-init) "
        "and `--model hu-histogram` (share of head voxels in 41 bins of 5 HU from -50 to 150 HU, and mean, SD "
        "and percentiles of HU within 0..100 HU; fmct.eval.radiomics; arm hu-histogram).",
        config="fmct.eval.embed:EmbedConfig",
    )
    parser.add_argument(
        "--model",
        required=True,
        metavar="RUN|DIR|scratch|hu-histogram",
        help="pretraining run or model folder; scratch (with --like): random-init floor; hu-histogram: radiomics floor",
    )
    parser.add_argument(
        "--like",
        metavar="RUN|DIR",
        help="with --model scratch, where it is needed: the model whose architecture "
        "and windows to take, weights drawn from init_seed (default: none)",
    )
    parser.add_argument("--store", required=True, help="store folder written by fmct ingest")
    parser.add_argument(
        "--out", required=True, metavar="EMB", help="embeddings folder (resumed from its finished chunks)"
    )
    parser.add_argument("--batch-size", type=int, help="volumes per forward pass")
    parser.add_argument("--workers", type=int, help="threads reading volumes from the store")
    parser.add_argument(
        "--arm", help="arm recorded with the embeddings (default: pretrained, random-init or hu-histogram)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    _add_config_args(parser, "chunk_size=512 init_seed=1")
    parser.set_defaults(run=_embed_run)


def _embed_run(args) -> int:
    from fmct.config import load_config
    from fmct.eval.embed import EmbedConfig, embed_store

    flags = {"batch_size": args.batch_size, "workers": args.workers, "arm": args.arm, "compile": args.compile or None}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    config = load_config(EmbedConfig, args.config, args.overrides + overrides)
    summary = embed_store(args.model, args.store, args.out, config, like=args.like)
    if summary.rank == 0:  # under torchrun, rank 0 wrote the table
        print(summary.describe())
    return 0


# ---------------------------------------------------------------------------------------- finetune
def _finetune_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "finetune",
        "backbone + head trained on labels per budget and seed -> predictions; resumes",
        "fmct finetune --model run --store store --labels cohort/labels.csv --out finetune "
        "--label-fractions 0.1,1 --max-steps 200",
        config="fmct.eval.finetune:FinetuneConfig",
    )
    parser.add_argument(
        "--model", required=True, metavar="RUN|DIR|scratch", help="pretraining run, model folder, or scratch"
    )
    parser.add_argument(
        "--like",
        metavar="RUN|DIR",
        help="with --model scratch: take the architecture and windows of this model "
        "(default: none, the config's `model`)",
    )
    parser.add_argument("--store", required=True, help="store folder written by fmct ingest")
    parser.add_argument(
        "--labels", required=True, help="labels CSV (README: The labels file), or [cq500:|rsna:|generic:]FILE"
    )
    parser.add_argument("--out", required=True, help="predictions folder (finished fits in it are reused)")
    parser.add_argument(
        "--head",
        choices=["linear", "pooled", "attentive"],
        help="linear: on the CLS token; pooled: on the CLS, mean and max of the patch tokens; "
        "attentive: one learned query over the patch tokens",
    )
    parser.add_argument(
        "--trainable-blocks",
        type=int,
        help="train only the last k blocks and the final norm (0: frozen backbone; -1: all blocks)",
    )
    _add_budget_args(parser, "train")
    _add_saliency_examples_arg(parser)
    parser.add_argument("--batch-size", type=int, help="volumes per training step (at least 2)")
    parser.add_argument("--max-steps", type=int, help="training steps per fit (early stopping may end sooner)")
    parser.add_argument(
        "--lr",
        type=float,
        help="peak learning rate of the head and the top block; lower blocks get lr x layer_decay per block below",
    )
    parser.add_argument("--workers", type=int, help="threads reading volumes from the store")
    parser.add_argument("--name", help="model name in the predictions (default: from the model folder)")
    parser.add_argument("--arm", help="arm in the predictions (default: pretrained, or scratch)")
    parser.add_argument("--rename", help=_RENAME_HELP)
    _add_config_args(parser, "patience=5 layer_decay=0.75")
    parser.set_defaults(run=_finetune_run)


def _finetune_run(args) -> int:
    from pathlib import Path

    from fmct.config import load_config
    from fmct.eval.finetune import FinetuneConfig, run_finetune

    scalars = (
        "head",
        "trainable_blocks",
        "seeds",
        "first_seed",
        "batch_size",
        "max_steps",
        "lr",
        "workers",
        "name",
        "arm",
    )
    overrides = _flag_overrides(args, BUDGET_LISTS, scalars)
    config = load_config(FinetuneConfig, args.config, args.overrides + overrides)
    rename = _parse_rename(args.rename)
    summary = run_finetune(
        args.model,
        args.store,
        args.labels,
        args.out,
        config,
        like=args.like,
        rename=rename or None,
        saliency_examples=args.saliency_examples,
    )
    print(summary.describe(Path(args.out)))
    return 0 if summary.n_predictions else 1


# ------------------------------------------------------------------------------------------ predict
_DETECTOR_HELP = (
    "a detector folder, or the output folder of fmct probe or finetune (its seed-0 fit trained on the most "
    "labels unless --fit names one)"
)


def _predict_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "predict",
        "a detector on new DICOM/NIfTI scans -> calibrated probabilities, decisions, saliency maps",
        "fmct predict --model finetune --out predictions /data/new_scan_dicom scan2.nii.gz --saliency",
        about="A detector on new scans: each PATH (a DICOM folder, DICOM files, NIfTI files) goes through ingest's "
        "selection, geometry and canonical grid in memory, then the detector. OUT/predictions.csv: per scan "
        "(named by pseudonym) and finding the calibrated probability, and the threshold and decision at each "
        "operating point set on the validation split; OUT/errors.csv: why a scan could not be used. "
        "A re-run resumes.",
        config="fmct.predict:PredictConfig",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help=_DETECTOR_HELP)
    parser.add_argument(
        "--fit", help="the fit of a probe/finetune output to use, e.g. fraction1-seed0 (default: seed 0, most labels)"
    )
    parser.add_argument("--out", required=True, help="folder for predictions.csv, errors.csv and saliency/ (resumed)")
    parser.add_argument(
        "--saliency",
        action="store_true",
        help="per scan and finding a heatmap (Integrated Gradients) as NIfTI on the scan's own grid and a PNG",
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        help="pseudonym key naming the scans, as fmct ingest's --key (default: "
        "$FMCT_KEY_FILE, else ~/.config/fmct/pseudonym.key)",
    )
    parser.add_argument(
        "--require-validated",
        action="store_true",
        help="refuse (exit 2) a detector with a finding its validation split cannot tell from chance; "
        "without it, such a finding gets a warning line",
    )
    parser.add_argument("--batch-size", type=int, help="scans per forward pass")
    parser.add_argument("--workers", type=int, help="threads reading scans ahead of the model")
    parser.add_argument("--config", help=_CONFIG_HELP)
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="PATH|key=value",
        help="DICOM folders or files and NIfTI files, then config overrides, e.g. saliency_steps=32",
    )
    parser.set_defaults(run=_predict_run)


def _predict_run(args) -> int:
    from fmct.config import load_config
    from fmct.predict import PredictConfig, predict

    overrides = [item for item in args.inputs if _OVERRIDE.match(item)]
    paths = [item for item in args.inputs if not _OVERRIDE.match(item)]
    if not paths:
        raise UsageError("no PATH given")
    flags = {
        "batch_size": args.batch_size,
        "workers": args.workers,
        "saliency": args.saliency or None,
        "require_validated": args.require_validated or None,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    config = load_config(PredictConfig, args.config, overrides)
    summary = predict(args.model, paths, args.out, config, fit=args.fit, key_file=args.key)
    print(summary.describe())
    return 0 if summary.ok else 1


def _export_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "export",
        "a detector as ONNX (dynamic batch), checked against PyTorch with ONNX Runtime",
        "fmct export --model finetune --out detector.onnx",
        about="A detector as one ONNX file: input float32 HU (batch, 1, X, Y, Z) on the detector's canonical grid, "
        "output calibrated probabilities (batch, findings); resize, HU windows and calibration are inside the graph, "
        'the findings and operating points in its metadata. Needs the export extra: pip install "fmct[export]".',
    )
    parser.add_argument("--model", required=True, metavar="DIR", help=_DETECTOR_HELP)
    parser.add_argument("--fit", help="the fit of a probe/finetune output to export (default: seed 0, most labels)")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    parser.set_defaults(run=_export_run)


def _export_run(args) -> int:
    from fmct.export import export_onnx

    result = export_onnx(args.model, args.out, fit=args.fit)
    print(
        f"export: {', '.join(result['findings'])} -> {result['path']} (input {result['input_shape']}; "
        f"onnxruntime vs torch max |difference| {result['max_abs_difference']:.1e})"
    )
    return 0


# --------------------------------------------------------------------------------------------- demo
def _demo_parser(sub) -> None:
    parser = _add_verb(
        sub,
        "demo",
        "the whole data flow on a synthetic multi-site cohort: what pretraining buys",
        "fmct demo --out demo_out seeds=3",
        about="The whole data flow on a synthetic multi-site cohort, each stage a public verb: what pretraining buys, "
        "in- and out-of-distribution. A re-run resumes where it stopped.",
    )
    parser.add_argument("--out", default="demo_out", help="demo folder (created or resumed)")
    parser.add_argument(
        "--scale",
        choices=sorted(DEMO_SCALES),
        default="small",
        help="small: a 2-core laptop, under 10 minutes; large: a GPU",
    )
    _add_config_args(parser, "n_scans=400 seeds=3 (the keys of fmct.demo.DemoConfig)")
    parser.set_defaults(run=_demo_run)


def _demo_run(args) -> int:
    from fmct.demo import load_demo_config, run_demo

    return run_demo(load_demo_config(args.config, args.scale, args.overrides), Path(args.out), run_verb=main)


# In the order of the data flow, as `fmct --help` lists them.
PARSERS = [
    _synth_parser,
    _ingest_parser,
    _store_parser,
    _pretrain_parser,
    _release_parser,
    _embed_parser,
    _probe_parser,
    _finetune_parser,
    _evaluate_parser,
    _report_parser,
    _predict_parser,
    _export_parser,
    _demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``fmct [--version]`` and one sub-parser per verb of :data:`PARSERS`."""
    parser = argparse.ArgumentParser(
        prog="fmct",
        description="Self-supervised 3D foundation model for head CT.",
        epilog=_EXIT_STATUS,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fmct {importlib.metadata.version('fmct')}")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        default=0,
        help="warnings and errors only, no progress bars",
    )
    loudness.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", help="debug lines too")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Positionals may stand on both sides of options (`ingest A --out S B k=v`): argparse leaves the later
    # ones over, and they join the verb's positional list.
    args, extra = parser.parse_known_args(argv)
    positional = "inputs" if hasattr(args, "inputs") else "overrides" if hasattr(args, "overrides") else None
    if positional is None or any(item.startswith("-") for item in extra):
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    else:
        setattr(args, positional, getattr(args, positional) + extra)
    configure_logging(args.verbosity)
    try:
        return args.run(args)
    except FmctError as error:  # one line a user can act on; any other exception is a bug and keeps its traceback
        logger.error(f"fmct {args.verb}: {error}")
        return error.exit_status
    except KeyboardInterrupt:
        logger.error(f"fmct {args.verb}: interrupted; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
