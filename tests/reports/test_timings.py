"""Per-rule run timings from Snakemake benchmark files."""
from analysis.timings import read_benchmarks, rule_timings

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, wall, rss, cpu):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{wall}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")


def test_rule_timings_sum_per_rule_with_total(tmp_path):
    _bench(tmp_path / "score" / "m" / "xsum" / "0-of-1.tsv", 10.5, 900.0, 20.0)
    _bench(tmp_path / "score" / "m" / "code" / "0-of-1.tsv", 4.5, 1200.0, 8.0)
    _bench(tmp_path / "sweep" / "m.tsv", 100.0, 700.0, 190.0)
    _bench(tmp_path / "database.tsv", 1.0, 100.0, 0.5)  # a rule without wildcards
    (tmp_path / "empty.tsv").write_text("")  # a job killed before it wrote its benchmark
    jobs = read_benchmarks(tmp_path)
    assert jobs.height == 4
    t = {r["rule"]: r for r in rule_timings(jobs).iter_rows(named=True)}
    assert t["score"]["jobs"] == 2 and t["score"]["wall_s"] == 15.0 and t["score"]["cpu_s"] == 28.0
    assert t["score"]["max_rss_mib"] == 1200.0
    assert t["total"]["jobs"] == 4 and t["total"]["wall_s"] == 116.0 and t["total"]["cpu_s"] == 218.5
    assert list(rule_timings(jobs)["rule"]) == ["sweep", "score", "database", "total"]
