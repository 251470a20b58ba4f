"""Command line: `mtd-fast {train,evaluate,stats,experiment,preprocess,compare}` (also `python -m mtd_fast`).

Every MTDConfig / TrainConfig field is a flag with the API's name and default
(`batch_size` -> `--batch-size`), so the CLI and `mtd_fast.train` never drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main"]


def _field_type(tp: Any):
    """(argparse type, is_bool) for a dataclass field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, {"Optional": Optional, "typing": typing})  # annotations are strings (PEP 563)
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if tp is bool:
        return None, True
    return tp, False


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from .config import MTDConfig, TrainConfig

    for cls, title in ((MTDConfig, "model options (MTDConfig)"), (TrainConfig, "training options (TrainConfig)")):
        group = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            typ, is_bool = _field_type(f.type)
            if is_bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=f"(default {f.default})")
            else:
                group.add_argument(flag, dest=f.name, type=typ, default=None, help=f"(default {f.default})")


def _config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from .config import MTDConfig, TrainConfig

    names = [f.name for cls in (MTDConfig, TrainConfig) for f in dataclasses.fields(cls)]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _add_data_flags(p: argparse.ArgumentParser, compact_ids: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help="synthetic (default), diginetica, retailrocket, yoochoose1_64, yoochoose1_64_mtd")
    g.add_argument("--data-dir", default=None,
                   help="folder in the SR-GNN pickle layout (default $MTD_FAST_DATA/<name>)")
    g.add_argument("--fraction", type=float, default=1.0,
                   help="keep the most recent ceil(fraction * n) training sessions (ids, catalogue, test unchanged)")
    g.add_argument("--n-sessions", type=int, default=None, help="synthetic: number of sessions (5000)")
    g.add_argument("--n-items", type=int, default=None, help="synthetic: number of items (500)")
    g.add_argument("--data-seed", type=int, default=None, help="synthetic: generator seed (0)")
    if compact_ids:
        g.add_argument("--compact-ids", action="store_true",
                       help="renumber the items that occur to 1..D (for sparse ids); models keep the mapping and "
                            "recommend() takes and returns the original ids")


_SYNTHETIC_FLAGS = (("n_sessions", "n_sessions"), ("n_items", "n_items"), ("data_seed", "seed"))


def _synthetic_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The synthetic generator's options from --n-sessions / --n-items / --data-seed; an error
    when they are given for a dataset read from files (they would be ignored)."""
    kwargs = {}
    synthetic = args.dataset in (None, "synthetic") and args.data_dir is None
    for flag, key in _SYNTHETIC_FLAGS:
        if getattr(args, flag) is not None:
            if not synthetic:
                from .config import ConfigError

                what = args.dataset if args.dataset is not None else f"the folder {args.data_dir}"
                raise ConfigError(f"--{flag.replace('_', '-')} applies to the synthetic dataset only; this command "
                                  f"reads {what}, whose files fix it")
            kwargs[key] = getattr(args, flag)
    return kwargs


def _load(args: argparse.Namespace):
    from .data import load_dataset

    extra = {"compact_ids": True} if getattr(args, "compact_ids", False) else {}
    return load_dataset(args.dataset, root=args.data_dir, fraction=args.fraction, **_synthetic_kwargs(args), **extra)


def _check_output_file(flag: str, path: Optional[str]) -> None:
    """Before any training: the file's folder exists and is writable, the path is not a folder
    (else a finished run would be lost at the very end)."""
    if path is None:
        return
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder, not a file name")
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise PermissionError(f"{flag} {path}: not writable")


def _fmt_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    from .experiments.report import markdown_table  # the one markdown renderer

    return markdown_table(rows, cols)


def _metrics_table(metrics: dict[str, Any]) -> str:
    from .metrics import KS

    rows = []
    for label, m in (("test (validation-picked)", metrics), ("best epoch on test (published protocol)",
                                                             metrics.get("best_on_test"))):
        if m:
            rows.append({"": label, **{f"{k}@{n}": m[f"{k}@{n}"] for k in ("P", "MRR", "NDCG") for n in KS}})
    cols = [""] + [f"{k}@{n}" for k in ("P", "MRR", "NDCG") for n in KS]
    return _fmt_table(rows, cols)


def cmd_train(args: argparse.Namespace) -> int:
    import mtd_fast

    from . import rundir
    from .distributed import Dist, init_from_env
    from .experiments.runner import cli_command

    if args.resume and args.run_dir is None:
        raise ValueError("--resume needs --run-dir: the run directory to continue")
    overrides = _config_overrides(args)
    launched = init_from_env(overrides.get("device", "cpu"), args.dist_timeout)  # under torchrun
    args.hard_exit = launched
    try:
        dist = Dist()

        def preflight() -> None:  # every output checked before data loading and training
            _check_output_file("--save", args.save)
            _check_output_file("--json", args.json)
            if args.run_dir is not None:
                rundir.RunDir.check(args.run_dir, args.resume)

        dist.on_main(preflight)
        rundir.CLI_COMMAND = cli_command(args.argv)
        ds = _load(args)
        result = mtd_fast.train(ds, model=args.model, epochs=args.epochs, seed=args.seed, backend=args.backend,
                                quiet=args.quiet, run_dir=args.run_dir, resume=args.resume,
                                checkpoint_every=args.checkpoint_every, **overrides)
        if dist.main:
            _report_train(args, ds, result)
        if launched:
            # everyone past its last collective before any rank tears the group down: a rank that
            # destroyed it while another was still finishing aborted now and then (gloo, SIGABRT)
            torch_barrier()
    finally:
        rundir.CLI_COMMAND = None
        if launched:
            import torch.distributed as td

            td.destroy_process_group()
    return 0


def torch_barrier() -> None:
    import torch.distributed as td

    td.barrier()


def _report_train(args: argparse.Namespace, ds, result) -> None:
    import mtd_fast

    print(f"\n{args.model} on {ds.name}: best validation epoch {result.best_epoch}")
    print(_metrics_table(result.metrics))
    if args.save:
        mtd_fast.save(result.model, args.save)
        print(f"model saved to {args.save}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dataset": ds.name, "metrics": result.metrics,
                                               "history": result.history, "best_epoch": result.best_epoch,
                                               "backends": result.backends,
                                               "model_config": dataclasses.asdict(result.model_config),
                                               "train_config": dataclasses.asdict(result.train_config)},
                                              indent=2, default=str))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import mtd_fast

    model = mtd_fast.load(args.model_file, backend=args.backend)
    ds = _load(args)
    m = mtd_fast.evaluate(model, ds, split=args.split)
    print(_fmt_table([{"split": args.split, **m}], ["split", *m.keys()]))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    ds = _load(args)
    s = ds.stats()
    print(_fmt_table([s], list(s.keys())))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .data.raw import preprocess, save_pickle_layout

    ds = preprocess(args.input, format=args.format, fraction=args.fraction)
    save_pickle_layout(ds, args.out)
    s = ds.stats()
    print(_fmt_table([s], list(s.keys())))
    print(f"written to {args.out} (all_train_seq.txt, test.txt)")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, ExperimentError, run_experiment
    from .experiments.runner import cli_command

    if args.status:
        from .experiments.status import status_markdown

        if args.name not in EXPERIMENTS:
            raise ExperimentError(f"unknown experiment {args.name!r}: use one of {', '.join(EXPERIMENTS)}")
        print(status_markdown(Path(args.out) / args.name))
        return 0

    dataset = args.dataset if args.dataset is not None or args.data_dir is not None else "synthetic"
    options = {k: getattr(args, k) for k in ("hidden_sizes", "frequencies", "graph_weights", "gcn_layers", "checkpoint",
                                             "heatmap_sessions", "tsne_sessions", "tsne_classes")}
    result = run_experiment(args.name, dataset=dataset, root=args.data_dir, fraction=args.fraction,
                            dataset_kwargs=_synthetic_kwargs(args), models=args.models, seeds=args.seeds,
                            epochs=args.epochs, overrides=_config_overrides(args), out=Path(args.out),
                            quiet=args.quiet, backend=args.backend, command=cli_command(args.argv),
                            options=options, adopt=args.adopt or ())
    print(result["markdown"])
    print("written: " + ", ".join(str(p) for p in result["paths"].values()))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .experiments.paired import by_length, by_repeat, compare_files
    from .metrics import METRIC_KEYS

    bad = [k for k in args.metrics if k not in METRIC_KEYS]
    if bad:
        raise ValueError(f"--metrics {' '.join(bad)}: use some of {' '.join(METRIC_KEYS)}")
    print(f"A = {args.a}\nB = {args.b}\npaired over the same samples; 95% interval over the samples "
          "(normal approximation; seed-to-seed variation not included)\n")
    if args.by_length is None and args.by_repeat is None:
        rows = compare_files(Path(args.a), Path(args.b), args.metrics)
        print(_fmt_table(rows, ["split", "metric", "A", "B", "A - B", "95% half-width"]))
        return 0
    root = Path(args.data_dir) if args.data_dir else None
    if args.by_length is not None:
        split, column, how = args.by_length, "length", "by prefix length (clicks before the target)"
        rows = by_length(Path(args.a), Path(args.b), split, args.metrics, root)
    else:
        split, column, how = args.by_repeat, "target", "by target: a re-click of an item in the prefix, or new"
        rows = by_repeat(Path(args.a), Path(args.b), split, args.metrics, root)
    print(f"{split} samples {how}; ± is the 95% half-width\n")
    print(_fmt_table(rows, [column, "samples", *(f"{c} {k}" for k in args.metrics
                                                 for c in ("A", "B", "A - B", "±"))]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--epoch 3` must not silently mean `--epochs 3`
    p = argparse.ArgumentParser(prog="mtd-fast", description="Fast MTD session-based recommendation",
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, allow_abbrev=False, **kw)

    t = add_parser("train", help="train a model and print test metrics (validation-picked epoch)")
    _add_data_flags(t)
    t.add_argument("--model", default="mtd", help="mtd (default), an ablation (mtd-va, mtd-at, mtd-lo, mtd-ga) "
                                                   "or a baseline (pop, spop, itemknn, gru4rec, narm, stamp, "
                                                   "sasrec, srgnn, csrm, cosan)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--backend", default=None,
                   help="auto | reference | cpp | numba | triton | ... (default $MTD_FAST_BACKEND or auto)")
    t.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    t.add_argument("--save", default=None, help="write the trained model here")
    t.add_argument("--json", default=None, help="write metrics and history as JSON here")
    t.add_argument("--run-dir", default=None,
                   help="write configs, per-epoch JSON lines, curves and checkpoints here as training goes")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                   help="with --run-dir, also checkpoint every STEPS training steps within an epoch (default: at "
                        "epoch ends only); a kill then loses at most STEPS steps, and the resume stays exact")
    t.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a process waits for the others before failing (600)")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = add_parser("evaluate", help="evaluate a saved model")
    e.add_argument("model_file")
    _add_data_flags(e)
    e.add_argument("--split", default="test", choices=["valid", "test"])
    e.add_argument("--backend", default=None, help="(default $MTD_FAST_BACKEND or auto)")
    e.set_defaults(func=cmd_evaluate)

    s = add_parser("stats", help="dataset statistics (the paper's Table 1)")
    _add_data_flags(s)
    s.set_defaults(func=cmd_stats)

    pr = add_parser("preprocess", help="raw click log -> SR-GNN pickle layout")
    pr.add_argument("input", help="raw file (Diginetica CSV, yoochoose-clicks.dat, GRU4Rec TSV, events.csv)")
    pr.add_argument("--format", default=None, help="diginetica | yoochoose | yoochoose_tsv | retailrocket (auto)")
    pr.add_argument("--fraction", type=float, default=1.0,
                    help="keep the most recent fraction of training SAMPLES, SR-GNN's yoochoose1_64 convention "
                         "(whole sessions kept); unlike train/stats --fraction, which counts sessions")
    pr.add_argument("--out", required=True, help="output folder")
    pr.set_defaults(func=cmd_preprocess)

    x = add_parser("experiment", help="paper experiments (resumable): table2, ablation, sensitivity, interpret, "
                                          "graph_modes",
                       description="Writes one JSON result file per (dataset, model, seed) under OUT/NAME/ and "
                                   "skips runs whose file is already there; merges every file there into "
                                   "OUT/NAME.md, OUT/NAME.json and PNG figures.")
    x.add_argument("name", help="table2 | ablation | sensitivity | interpret | graph_modes")
    _add_data_flags(x, compact_ids=False)  # the experiment runner loads its own data
    x.add_argument("--models", nargs="+", default=None,
                   help="table2 / ablation: the models to run; graph_modes: the variants (default: all)")
    x.add_argument("--seeds", "--seed", dest="seeds", nargs="+", type=int, default=None,
                   help="training seeds (default: 0; ablation 0 1 2)")
    x.add_argument("--epochs", type=int, default=30,
                   help="at most this many epochs; early stopping on validation (--patience) decides (30)")
    x.add_argument("--backend", default=None, help="auto | reference | ... (default $MTD_FAST_BACKEND or auto)")
    x.add_argument("--out", default="benches/figures", help="output folder (benches/figures)")
    x.add_argument("--quiet", action="store_true", help="no progress bars")
    x.add_argument("--status", action="store_true",
                   help="print where the study in OUT/NAME stands (finished, in progress, set aside) and exit: "
                        "reads the folder only, safe beside a running invocation")
    x.add_argument("--adopt", nargs="+", default=None, metavar="RESULT.json",
                   help="take these finished result files of another study (another label, the same dataset, "
                        "model, seed, epochs cap and resolved configs) as this study's runs instead of training "
                        "them; each copy records where it came from")
    g = x.add_argument_group("sensitivity")
    g.add_argument("--hidden-sizes", nargs="+", type=int, default=None, help="(25 50 100 150 200)")
    g.add_argument("--frequencies", nargs="+", type=int, default=None,
                   help="rec_frequency f values of the phase graph modes (1 .. 8)")
    g.add_argument("--graph-weights", nargs="+", type=float, default=None,
                   help="graph_weight lambda_g values of the per-step graph modes (0 0.1 0.3 1 3)")
    g.add_argument("--gcn-layers", nargs="+", type=int, default=None, help="num_gcn_layers values (1 .. 4)")
    g = x.add_argument_group("interpret")
    g.add_argument("--checkpoint", nargs="+", default=None, metavar="MODEL=PATH",
                   help="use these saved models (mtd-fast train --save) instead of training mtd / srgnn / stamp")
    g.add_argument("--heatmap-sessions", type=int, default=None, help="sessions drawn as attention heatmaps (4)")
    g.add_argument("--tsne-sessions", type=int, default=None, help="session representations projected (180)")
    g.add_argument("--tsne-classes", type=int, default=None, help="target classes among them (6)")
    _add_config_flags(x)
    x.set_defaults(func=cmd_experiment)

    c = add_parser("compare", help="two finished runs' result files, paired over the same samples (rank files)",
                   description="Reads two result files written by `mtd-fast experiment` (and the rank file "
                               "beside each) and prints, for validation and test, both metrics and their "
                               "difference A - B with a 95%% interval over the samples.")
    c.add_argument("a", help="result file A (OUT/NAME/<dataset>__<label>__seed<S>.json)")
    c.add_argument("b", help="result file B, of the same dataset")
    c.add_argument("--metrics", nargs="+", default=["P@20", "MRR@20"], help="(P@20 MRR@20)")
    by = c.add_mutually_exclusive_group()
    by.add_argument("--by-length", nargs="?", const="test", default=None, choices=["valid", "test"],
                    help="per prefix-length bucket of this split (test when given alone); loads the runs' data")
    by.add_argument("--by-repeat", nargs="?", const="test", default=None, choices=["valid", "test"],
                    help="targets that re-click an item of their prefix apart from new ones, in this split "
                         "(test when given alone); loads the runs' data")
    c.add_argument("--data-dir", default=None, help="with --by-length / --by-repeat: the runs' data folder, "
                                                    "when it moved since (checked against the runs)")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import warnings

    import torch.distributed as td

    from .config import ConfigError
    from .data.store import DataError
    from .distributed import DistError
    from .ops.dispatch import BackendError
    from .provenance import source_commit

    source_commit()  # the checkout as this process starts (cached): a commit made while it runs is not its code
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by experiments as the exact command
    args.hard_exit = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            rc = args.func(args)
    except (DataError, ConfigError, BackendError, OSError, TypeError, ValueError, FloatingPointError) as exc:
        if os.environ.get("MTD_FAST_DEBUG"):
            raise
        print(f"mtd-fast: error: {exc}  (set MTD_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        rc = 2
    except (DistError, td.DistError) as exc:  # under torchrun: another process failed, was killed or timed out
        if os.environ.get("MTD_FAST_DEBUG"):
            raise
        first = (str(exc).splitlines() or [""])[0]
        print(f"mtd-fast: error: {first}  (set MTD_FAST_DEBUG=1 for the traceback)", file=sys.stderr)
        rc = 3
    if args.hard_exit:
        # A process that ran a gloo group aborted now and then AFTER its work, in the interpreter's
        # teardown ("terminate called without an active exception", no Python frame): about 1 in
        # 30 torchrun runs of 2 processes here, still 2 in 90 with a barrier before
        # destroy_process_group; torchrun then reports the whole job failed. Everything is written
        # and the group destroyed: leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `mtd-fast: warning: ...` lines, without the source line under them."""
    print(f"mtd-fast: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
