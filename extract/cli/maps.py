"""``dormant maps run|report``: MAPS static scores, dynamic and causal checks for one model; tables and figures.

``run`` takes its settings as ``--config maps.json`` (:class:`extract.maps.run.MapsSettings`, what the
workflow writes from the config's ``maps`` section) plus override flags generated from that dataclass, and
writes into ``--out-dir``: ``scores.parquet`` (table maps_scores), ``salient.parquet`` (maps_salient),
``dynamic.parquet`` (maps_dynamic), ``correlations.parquet`` (maps_correlations), ``causal.parquet``
(maps_causal) and ``timing.json`` (:func:`extract.maps.run.run`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from extract.cli import options


def _run(args: argparse.Namespace) -> int:
    from extract.maps.run import MapsSettings, run

    options.set_threads(args.threads)
    settings = options.settings_from_args(MapsSettings, args)
    for p in run(args.model, settings, args.out_dir, dtype=args.dtype, device=args.device):
        print(f"wrote {p}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.maps import write_maps_reports

    paths = write_maps_reports(args.maps_dirs, args.core_db, args.out, inactive_below=args.inactive_below,
                               salient_min=args.salient_min)
    for p in paths:
        if p.suffix == ".md":
            print(f"## {p.stem}\n{p.read_text()}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def add_maps_parser(subparsers) -> None:
    """``dormant maps run`` (one model, torch) and ``dormant maps report`` (tables and figures, no torch)."""
    from extract.maps.run import MapsSettings

    p = subparsers.add_parser("maps", help="MAPS: head functions from parameters, checked against inference")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="static, dynamic and causal MAPS analysis of one model (Parquet files)")
    options.add_model(r)
    options.add_out(r, "folder of the Parquet files and timing.json", flag="--out-dir")
    options.add_dtype(r)
    options.add_device(r)
    options.add_threads(r)
    options.add_settings(r, MapsSettings, doc="MAPS")
    r.set_defaults(func=_run)
    q = sub.add_parser("report", help="MAPS tables and figures from the run outputs and the core database")
    q.add_argument("--maps-dirs", nargs="+", required=True, type=Path, help="output folders of `maps run`")
    q.add_argument("--core-db", type=Path, help="database with head_scores (for the join with ahon_ln)")
    q.add_argument("--out", type=Path, default=Path("results"))
    q.add_argument("--inactive-below", type=float, default=0.5,
                   help="a head is inactive when its median ahon_ln is below this (config maps.join.inactive_below)")
    q.add_argument("--salient-min", type=float, default=0.2,
                   help="a head has a salient operation when its best static score reaches this "
                        "(config maps.join.salient_min)")
    q.set_defaults(func=_report)


def register(sub) -> None:
    add_maps_parser(sub)
