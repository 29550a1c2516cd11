"""``dormant domains candidates|ablate|scatter``: dormant-by-domain heads in real LLMs (definitions §7).

``ablate`` takes its settings as ``--config domain_ablate.json`` (:class:`extract.domains.DomainAblationSettings`,
what the workflow writes from ``mechanism.domains``) plus override flags generated from that dataclass.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _candidates(args: argparse.Namespace) -> int:
    from analysis.core.score_functions import check_score_key
    from analysis.domains import CandidateSettings, write_domain_report

    st = settings_from_args(CandidateSettings, args)
    check_score_key(st.score_fn)
    paths = write_domain_report(args.db, args.out, score_fn=st.score_fn, top=st.top, fraction=st.fraction,
                                models=args.models)
    options.print_written(paths, show=("domain_heads.md",))
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from extract.domains import DomainAblationSettings, ablate

    options.set_threads(args.threads)
    settings = settings_from_args(DomainAblationSettings, args)
    for p in ablate(args.model, args.candidates, args.data, args.out, settings, dtype=args.dtype, device=args.device):
        print(f"wrote {p}")
    return 0


def _scatter(args: argparse.Namespace) -> int:
    from analysis.domains import write_scatter_report

    paths = write_scatter_report(args.ablation, args.out, args.candidates)
    options.print_written(paths, show=("domain_scatter.md",))
    return 0


def register(sub) -> None:
    """``dormant domains candidates`` (no torch), ``ablate`` (one model), ``scatter`` (no torch)."""
    from analysis.domains import CandidateSettings
    from extract.domains import DomainAblationSettings

    p = sub.add_parser("domains", help="heads dormant on one domain and active on another (definitions §7)")
    cmds = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = cmds.add_parser("candidates", help="per-domain head means, candidate table and figures from the database")
    c.add_argument("--db", type=Path, default=Path("results/db/core.duckdb"))
    c.add_argument("--out", type=Path, default=Path("results"))
    add_settings(c, CandidateSettings, doc="candidate")
    c.add_argument("--models", nargs="*", help="models to draw a figure for (default: every model in the database)")
    c.set_defaults(func=_candidates)
    a = cmds.add_parser("ablate", help="per-example loss change from zeroing (and mean-ablating) each of a model's "
                       "top candidate heads")
    options.add_model(a)
    a.add_argument("--candidates", type=Path, default=Path("results/domains/candidates.parquet"))
    a.add_argument("--data", nargs="+", required=True, type=Path, help="corpus JSON-lines files")
    options.add_out(a, "Parquet file to write (atomically)")
    options.add_dtype(a)
    options.add_device(a)
    options.add_threads(a)
    add_settings(a, DomainAblationSettings, doc="domain ablation")
    a.set_defaults(func=_ablate)
    s = cmds.add_parser("scatter", help="active-dormant scatter figures and summary table from ablate outputs")
    s.add_argument("--ablation", nargs="+", required=True, type=Path, help="Parquet files of `domains ablate`")
    s.add_argument("--candidates", type=Path,
                   help="candidate table of `domains candidates` (awft): adds the split at each model's τ")
    s.add_argument("--out", type=Path, default=Path("results"))
    s.set_defaults(func=_scatter)
