"""Row count and an order-independent checksum of every table and view of a DuckDB file, and the sha256 of
every generated table file: `python scripts/checksums.py results` prints one line per object, so two runs
of one config are compared with `diff`. Columns that hold wall-clock measurements (seconds, timestamps)
differ between runs by nature and are left out of the checksum (named in the output). Tables are compared bit
for bit; views, which DuckDB computes at query time with parallel aggregates whose summation order varies
between two builds of the same rows (the means of ``head_summary`` differ in their last bits), are compared
with floating-point columns at 12 significant digits."""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import duckdb

TIMING = re.compile(r"(^|_)(s|seconds|wall|wall_s|cpu_s|time|elapsed|started|finished|ratio_cost|cost_ratio)$"
                    r"|^(wall|time|elapsed|seconds|cpu)|_time_|timing|_s$")


def db_lines(path: Path) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    out = []
    names = con.execute("SELECT table_name, table_type FROM information_schema.tables "
                        "WHERE table_schema = 'main' ORDER BY table_name").fetchall()
    for name, kind in names:
        info = con.execute(f"SELECT column_name, data_type FROM information_schema.columns WHERE "
                           f"table_name = '{name}' ORDER BY ordinal_position").fetchall()
        cols = [c for c, _ in info]
        keep = [(c, t) for c, t in info if not TIMING.search(c)]
        left = sorted(set(cols) - {c for c, _ in keep})

        def value(c, t):
            return f"printf('%.12g', \"{c}\")" if kind == "VIEW" and t in ("DOUBLE", "FLOAT") else f'"{c}"'

        expr = "struct_pack(" + ", ".join(f'"{c}" := {value(c, t)}' for c, t in keep) + ")"
        n, h = con.execute(f'SELECT count(*), coalesce(bit_xor(hash({expr})), 0) FROM "{name}"').fetchone()
        out.append(f"db {path.name} {kind.lower()} {name}: rows={n} checksum={h:016x}"
                   + (f" (left out: {', '.join(left)})" if left else ""))
    return out


def file_lines(root: Path) -> list[str]:
    out = []
    for f in sorted((root / "tables").glob("*.csv")):
        if TIMING.search(f.stem) or f.stem in {"timings", "sweep_cost"}:
            out.append(f"table {f.name}: timing table, left out")
            continue
        out.append(f"table {f.name}: sha256={hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "results")
    for db in sorted(root.rglob("*.duckdb")):
        print("\n".join(db_lines(db)))
    print("\n".join(file_lines(root)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
