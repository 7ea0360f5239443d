"""The report's "Pareto front" section (`simulations.report`): front, codec pairs, plot.

Synthetic run records as in ``test_compare.py``: the numbers are chosen so that the front and
every verdict are known in advance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations import report
from tests.test_compare import parse_tables, synthetic_meta, synthetic_record

MB = report.MB


def record(
    method: str, seed: int, accuracy: float, up: int, down: int, setting: str = "iid"
) -> dict[str, Any]:
    """A finished run's record in ``setting`` (``synthetic_record`` writes ``iid`` ones)."""
    run = synthetic_record(method, seed, accuracy, up, down)
    return {**run, "setting": setting, "run_name": f"{setting}-{method}-s{seed}"}


# Means in kB (up + down) and accuracy, iid:
#   fedavg        1100 kB 0.810      cmd        550 kB 0.815  -> 0.50 x, +0.50: met
#   fedavg-int8   1000 kB 0.800      cmd-int8   400 kB 0.790  -> 0.40 x, -1.00: accuracy lower
#   fedavg-topk    800 kB 0.780      cmd-topk   640 kB 0.782  -> 0.80 x, +0.20: too many bytes
#   fedavg-fp16    300 kB 0.700      (no cmd-fp16: no pair)
# Front (MB ascending): fedavg-fp16, cmd-int8, cmd; cmd dominates every FedAvg but fp16's and
# cmd-topk. Up and down differ, so a total of one direction alone would give other numbers.
METHODS = ["fedavg", "fedavg-fp16", "fedavg-int8", "fedavg-topk", "cmd", "cmd-int8", "cmd-topk"]
IID_RECORDS = [
    ("fedavg", 0, 0.80, 700, 300),
    ("fedavg", 1, 0.82, 900, 300),
    ("cmd", 0, 0.81, 300, 200),
    ("cmd", 1, 0.82, 400, 200),
    ("fedavg-fp16", 0, 0.70, 100, 200),
    ("fedavg-int8", 0, 0.80, 200, 800),
    ("cmd-int8", 0, 0.79, 100, 300),
    ("fedavg-topk", 0, 0.78, 300, 500),
    ("cmd-topk", 0, 0.782, 240, 400),
]


def iid_records() -> list[dict[str, Any]]:
    """The iid runs above, bytes in kB (so 1100 stands for 1.1 MB)."""
    return [record(m, seed, acc, 1000 * up, 1000 * down) for m, seed, acc, up, down in IID_RECORDS]


def pareto_rows(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """``rows[setting][method][header] = cell`` from the Pareto section's tables."""
    section = markdown.split("## Pareto front", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, dict[str, str]]] = {}
    setting, header = "", list[str]()
    for line in section.splitlines():
        heading = re.match(r"### `([^`]+)`", line)
        if heading:
            setting, header = heading.group(1), []
            rows[setting] = {}
            continue
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method":
            header = cells
        elif not set(cells[0]) <= {"-"}:
            method = re.search(r"`([^`]+)`", cells[0])
            assert method, line
            rows[setting][method.group(1)] = dict(zip(header, cells, strict=True))
    return rows


# ----------------------------------------------------------------------------- the front


def test_front_keeps_undominated_points_and_ties() -> None:
    points = {
        "lean": (5.0, 0.70),
        "mid": (10.0, 0.80),
        "best": (20.0, 0.85),
        "twin": (20.0, 0.85),  # equal to best: neither dominates the other
        "worse": (30.0, 0.84),  # more MB, less accurate than best
        "same-mb": (10.0, 0.79),  # as many MB as mid, less accurate
        "same-acc": (12.0, 0.80),  # as accurate as mid, more MB
    }
    assert report.pareto_front(points) == ["lean", "mid", "best", "twin"]
    assert report.pareto_front({"only": (1.0, 0.5)}) == ["only"]
    assert report.pareto_front({}) == []


def test_codec_pairs_need_both_methods() -> None:
    assert report.codec_pairs(METHODS) == [
        ("none", "fedavg", "cmd"),
        ("int8", "fedavg-int8", "cmd-int8"),
        ("topk", "fedavg-topk", "cmd-topk"),
    ]
    assert report.codec_pairs(["fedavg-fp16", "cmd-fp16", "cmd"]) == [
        ("fp16", "fedavg-fp16", "cmd-fp16")
    ]
    assert report.codec_pairs(["cmd", "cmd-int8", "apf"]) == []


def test_pareto_front_ratios_and_verdicts_are_measured() -> None:
    # Prepare
    meta = synthetic_meta(METHODS, ["iid"], [0, 1])
    aggregates = report.aggregate(iid_records(), ["iid"], METHODS)
    # Execute
    found = report.evaluate_pareto(aggregates, meta)["iid"]
    # Assert: the front over the means, and each method's mean of up + down.
    assert found["front"] == ["fedavg-fp16", "cmd-int8", "cmd"]
    on_front = {m: row["on_front"] for m, row in found["methods"].items()}
    assert on_front == {m: m in {"fedavg-fp16", "cmd-int8", "cmd"} for m in METHODS}
    assert found["methods"]["fedavg"]["mb_total"] == pytest.approx(1.1)
    assert found["methods"]["fedavg"]["final_accuracy"] == pytest.approx(0.81)
    assert found["methods"]["cmd"]["runs"] == 2
    pairs = {pair["codec"]: pair for pair in found["pairs"]}
    assert list(pairs) == ["none", "int8", "topk"]  # fedavg-fp16 has no CMD partner
    expected = {  # codec: (ratio, points, met)
        "none": (0.50, 0.50, True),
        "int8": (0.40, -1.00, False),
        "topk": (0.80, 0.20, False),
    }
    for codec, (ratio, points, met) in expected.items():
        assert pairs[codec]["bytes_ratio"] == pytest.approx(ratio), codec
        assert pairs[codec]["accuracy_diff_points"] == pytest.approx(points), codec
        assert pairs[codec]["target_met"] is met, codec
    assert pairs["none"]["line"] == (
        "CMD: 0.550 MB at 81.50 % vs FedAvg: 1.100 MB at 81.00 %: 0.50 x the bytes, "
        "+0.50 points; target met. FedAvg's mean curve never reaches 81.50 %"
    )
    assert (
        "0.40 x the bytes, -1.00 points; target not met: not at equal accuracy: -1.00 points. "
        in pairs["int8"]["line"]
    )
    # At equal accuracy: FedAvg + int8's mean curve (0.267, 0.533, 0.800 over 3 rounds of
    # 1/3 MB) first reaches CMD + int8's 0.79 after all 1.0 MB.
    assert pairs["int8"]["fedavg_mb_at_cmd_accuracy"] == pytest.approx(1.0)
    assert pairs["int8"]["bytes_ratio_at_equal_accuracy"] == pytest.approx(0.40)
    assert pairs["int8"]["line"].endswith(
        "first reaches 79.00 % after 1.000 MB: 0.40 x the bytes at equal accuracy"
    )
    assert pairs["none"]["bytes_ratio_at_equal_accuracy"] is None
    assert pairs["int8"]["line"].startswith("CMD + int8: ")
    assert " vs FedAvg + int8: " in pairs["int8"]["line"]
    assert (
        "0.80 x the bytes, +0.20 points; target not met: 0.80 x the bytes is above 0.60 x. "
        in pairs["topk"]["line"]
    )


def test_pair_verdict_at_the_boundaries() -> None:
    label = {m: m for m in ("fedavg-int8", "cmd-int8")}

    def pair(cmd: tuple[float, float], fedavg: tuple[float, float]) -> dict[str, Any]:
        means = {"cmd-int8": cmd, "fedavg-int8": fedavg}
        return report._codec_pair("int8", "fedavg-int8", "cmd-int8", means, label)

    # Exactly 0.6 x the bytes at exactly equal accuracy (0.7 + 0.1 is 0.7999...): met.
    at_limit = pair((600 / MB, 0.7 + 0.1), (1000 / MB, 0.8))
    assert at_limit["target_met"] is True and "; target met." in at_limit["line"]
    # Just above 0.6 x: not met.
    above = pair((601 / MB, 0.9), (1000 / MB, 0.8))
    assert above["target_met"] is False
    assert "target not met: 0.60 x the bytes is above 0.60 x." in above["line"]
    # Both wrong: both reasons.
    both = pair((900 / MB, 0.75), (1000 / MB, 0.8))
    assert both["target_met"] is False
    assert "not at equal accuracy: -5.00 points; 0.90 x the bytes is above 0.60 x" in both["line"]


def test_mb_to_reach_is_the_first_round_at_the_accuracy() -> None:
    curve = {"accuracy": [0.5, 0.7, 0.69, 0.8], "cumulative_mb": [1.0, 2.0, 3.0, 4.0]}
    assert report.mb_to_reach(curve, 0.7) == 2.0
    assert report.mb_to_reach(curve, 0.75) == 4.0
    assert report.mb_to_reach(curve, 0.81) is None
    assert report.mb_to_reach({"accuracy": [], "cumulative_mb": []}, 0.1) is None


# ----------------------------------------------------------------------------- the report


def test_report_has_a_pareto_section_and_plot_per_setting(tmp_path: Path) -> None:
    # Prepare: iid has every method; in dirichlet only FedAvg finished.
    dirichlet_fedavg = record("fedavg", 0, 0.75, 600_000, 400_000, setting="dirichlet")
    records = [*iid_records(), dirichlet_fedavg]
    meta = synthetic_meta(METHODS, ["iid", "dirichlet"], [0, 1])
    # Execute
    results = report.write_report(tmp_path, meta, records)
    # Assert: results.json holds the section; the other tables are still read correctly.
    markdown = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert set(results["pareto"]) == {"iid", "dirichlet"}
    assert set(parse_tables(markdown)) == {"iid", "dirichlet"}
    assert set(parse_tables(markdown)["iid"]) == set(METHODS)
    for setting in ("iid", "dirichlet"):
        png = tmp_path / f"{setting}-pareto.png"
        assert png.read_bytes()[:4] == b"\x89PNG", setting
        assert f"{setting}-pareto.png" in results["plots"]
        assert f"({setting}-pareto.png)" in markdown
    rows = pareto_rows(markdown)
    iid = rows["iid"]
    assert {m for m, row in iid.items() if row["on the front"] == "**yes**"} == {
        "fedavg-fp16",
        "cmd-int8",
        "cmd",
    }
    assert iid["fedavg"]["mean total MB"] == "1.100"
    assert iid["cmd-topk"]["mean final accuracy (%)"] == "78.20"
    assert iid["cmd"]["runs"] == "2"
    for pair in results["pareto"]["iid"]["pairs"]:
        assert f"- {pair['line']}" in markdown
    # Dirichlet: FedAvg alone is the front; the pairs say what is missing, with no verdict.
    dirichlet = results["pareto"]["dirichlet"]
    assert dirichlet["front"] == ["fedavg"]
    assert rows["dirichlet"]["cmd"]["mean total MB"] == report.MISSING
    assert rows["dirichlet"]["fedavg"]["on the front"] == "**yes**"
    assert [p["target_met"] for p in dirichlet["pairs"]] == [None, None, None]
    lines = [p["line"] for p in dirichlet["pairs"]]
    assert lines[0] == "CMD vs FedAvg: no finished runs of CMD"
    assert lines[1] == (
        "CMD + int8 vs FedAvg + int8: no finished runs of CMD + int8 and FedAvg + int8"
    )


def test_a_single_method_report_has_a_front_and_no_pairs(tmp_path: Path) -> None:
    meta = synthetic_meta(["cmd"], ["iid"], [0])
    results = report.write_report(tmp_path, meta, [record("cmd", 0, 0.9, 300, 200)])
    markdown = (tmp_path / "report.md").read_text()
    assert results["pareto"]["iid"]["front"] == ["cmd"]
    assert results["pareto"]["iid"]["pairs"] == []
    assert "- no codec pair (`fedavg[-codec]` with `cmd[-codec]`) in this setting" in markdown
    assert (tmp_path / "iid-pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_draws_every_run_each_mean_and_the_front_as_a_step() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = synthetic_meta(METHODS, ["iid"], [0, 1])
    by_method = report.aggregate(iid_records(), ["iid"], METHODS)["iid"]
    fig, ax = plt.subplots()
    try:
        report._draw_pareto(ax, by_method, METHODS, meta)
        # Two scatters per method: its runs (light) and its mean (labelled).
        runs, means = ax.collections[0::2], ax.collections[1::2]
        assert [len(np.asarray(c.get_offsets())) for c in runs] == [2, 1, 1, 1, 2, 1, 1]
        assert [c.get_alpha() for c in runs] == [0.35] * len(METHODS)
        np.testing.assert_allclose(np.asarray(means[0].get_offsets())[0], [1.1, 0.81])
        labels = [text.get_text() for text in ax.texts]
        assert labels == [meta["methods"][m]["label"] for m in METHODS]
        step = ax.lines[0]
        assert step.get_drawstyle() == "steps-post"
        np.testing.assert_allclose(np.asarray(step.get_xdata()), [0.30, 0.40, 0.55])
        np.testing.assert_allclose(np.asarray(step.get_ydata()), [0.70, 0.79, 0.815])
        assert ax.get_xscale() == "linear"  # 0.3..1.1 MB: under 10 x
    finally:
        plt.close(fig)
