"""ovseg-bench --soak: the schedule of changes, and a short soak through the CLI with its report."""

from __future__ import annotations

import json

from ovseg.benchmarks import cli, soak


def test_every_period_does_the_same_changes_at_the_same_frames():
    plan = soak.SoakPlan.of(10_000)
    assert plan.period == soak.PERIOD
    periods = [[(plan.size(i), plan.action(i)) for i in range(k * plan.period, (k + 1) * plan.period)] for k in (1, 9)]
    assert periods[0] == periods[1]
    actions = [a for _, a in periods[0] if a]
    assert actions == ["vocabulary", "classes", "free", "vocabulary"]
    assert {s for s, _ in periods[0]} == set(soak.SIZES)
    assert plan.action(0) is None  # the first frame runs on the bundle's own vocabulary


def test_a_short_soak_reports_rss_latency_and_changes(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "soak.json"
    assert cli.main(["--bundle", str(tiny_bundle), "--soak", "24", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["frames"] == 24 and doc["period"] == 6 and doc["periods"] == 4
    assert doc["changes"] == {"vocabulary": 7, "classes": 4, "free": 4}
    assert doc["rss_after_warmup_mib"] > 0 and doc["rss_end_mib"] > 0 and doc["rss_growth"] is not None
    assert doc["p99_drift"] is not None
    assert [t["name"] for t in doc["targets"]] == [
        "RSS growth after warm-up",
        "p99 latency drift (last period vs second)",
    ]
    assert all(t["verdict"] in ("PASS", "MISS") for t in doc["targets"])
    table = capsys.readouterr().out
    assert "soak: 24 frames" in table and "7 vocabulary swaps" in table


def test_a_soak_too_short_to_compare_periods_is_refused(tiny_bundle, capsys):
    assert cli.main(["--bundle", str(tiny_bundle), "--soak", "3"]) == 2
    assert "--soak N takes N >= 8" in capsys.readouterr().err
