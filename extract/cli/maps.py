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

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _run(args: argparse.Namespace) -> int:
    from extract.maps.run import MapsSettings, run

    options.set_threads(args.threads)
    settings = settings_from_args(MapsSettings, args)
    for p in run(args.model, settings, args.out_dir, dtype=args.dtype, device=args.device):
        print(f"wrote {p}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.maps import JoinSettings, write_maps_reports

    st = settings_from_args(JoinSettings, args)
    paths = write_maps_reports(args.maps_dirs, args.core_db, args.out, inactive_below=st.inactive_below,
                               salient_min=st.salient_min, inputs_parquet=args.inputs_parquet)
    for p in paths:
        if p.suffix == ".md":
            print(f"## {p.stem}\n{p.read_text()}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def register(sub) -> None:
    """``dormant maps run`` (one model, torch) and ``dormant maps report`` (tables and figures, no torch)."""
    from analysis.maps import JoinSettings
    from extract.maps.run import MapsSettings

    p = sub.add_parser("maps", help="MAPS: head functions from parameters, checked against inference")
    cmds = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = cmds.add_parser("run", help="static, dynamic and causal MAPS analysis of one model (Parquet files)")
    options.add_model(r)
    options.add_out(r, "folder of the Parquet files and timing.json", flag="--out-dir")
    options.add_dtype(r)
    options.add_device(r)
    options.add_threads(r)
    add_settings(r, MapsSettings, doc="MAPS")
    r.set_defaults(func=_run)
    q = cmds.add_parser("report", help="MAPS tables and figures from the run outputs and the core database")
    q.add_argument("--maps-dirs", nargs="+", required=True, type=Path, help="output folders of `maps run`")
    q.add_argument("--core-db", type=Path, help="database with head_scores (for the join with ahon_ln)")
    q.add_argument("--out", type=Path, default=Path("results"))
    q.add_argument("--inputs-parquet", type=Path, help="also write table maps_inputs here (for the database)")
    add_settings(q, JoinSettings, doc="join")
    q.set_defaults(func=_report)
