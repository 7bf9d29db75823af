"""Figure fixes of issue 13 item 8 (single-point series visible, no "no value" markers on the data axis, the
paper's FP8 band only over FP8 groups, wrapped long policy labels) and the report's verdict tables."""
import math

import pandas as pd
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from studies.report.figures import Figures, heatmap, mean_band, point_ci
from studies.report.verdicts import failure_statement, failure_table


class _Keep(Figures):
    def save(self, fig, name):
        self.fig = fig
        return super().save(fig, name)


def test_single_point_series_is_drawn_with_a_marker():
    ax = Figure().subplots()
    mean_band(ax, pd.DataFrame({"t": [5.0, 5.0], "y": [1.0, 1.2]}), "t", "y", "C0", "one point")
    assert ax.lines[0].get_marker() == "o"
    mean_band(ax, pd.DataFrame({"t": [1.0, 2.0], "y": [1.0, 0.5]}), "t", "y", "C1", "two points")
    assert ax.lines[1].get_marker() in (None, "None", "")


def test_point_ci_band_only_on_fp8_groups_and_missing_values_not_on_the_data_axis(tmp_path):
    figs = _Keep(tmp_path, {})
    table = pd.DataFrame({"precision": ["fp32", "fp8-all", "fp32", "fp8-all"],
                          "optimizer": ["a", "a", "b", "b"], "speedup": [1.1, 1.6, math.nan, 0.9],
                          "lo": [1.0, 1.4, math.nan, 0.8], "hi": [1.2, 1.8, math.nan, 1.0]})
    point_ci(figs, table, "precision", "optimizer", ["fp32", "fp8-all"], ["a", "b"], "speedup", "lo", "hi",
             "speedup", "t", "x", missing={("fp32", "b"): "not reached"}, ref_line=1.0, band=(1.44, 2.14),
             band_label="paper", band_x={"fp8-all"})
    ax = figs.fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # one shaded group: fp8-all (x = 1)
    xs = bands[0].get_paths()[0].vertices[:, 0]
    assert xs.min() > 0.5 and xs.max() < 1.5
    assert not any(line.get_marker() == "v" for line in ax.lines)  # no fake point for the missing value
    note = [t for t in ax.texts if t.get_text() == "not reached"]
    assert len(note) == 1 and note[0].xycoords == ("data", "axes fraction")


def test_heatmap_wraps_long_policy_labels(tmp_path):
    figs = _Keep(tmp_path, {})
    long = "state=e4m3:tensor,state.exp_avg_sq=fp16"
    cells = pd.DataFrame({"precision": [long, "fp32"], "optimizer": ["adamw", "adamw"],
                          "diverged_frac": [0.5, 0.0], "diverged_k": [1, 0], "n": [2, 2]})
    heatmap(figs, cells, "precision", "optimizer", [long, "fp32"], ["adamw"], "t", "h")
    labels = [t.get_text() for t in figs.fig.axes[0].get_yticklabels()]
    assert "\n" not in long and any("\n" in v for v in labels)


def test_failure_table_and_statement_say_where_adamw_fails():
    summary = {"failure_map": {"gpt": {
        "state=e4m3": {"adamw": {"k": 6, "n": 6, "lo": 0.61, "hi": 1.0, "per_horizon": {"150": {"k": 3, "n": 3}},
                                 "explanations": ["seed 0: NaN in exp_avg_sq"]}},
        "state=e4m3:tensor": {"adamw": {"k": 0, "n": 6, "lo": 0.0, "hi": 0.39, "per_horizon": {},
                                        "explanations": []}}}}}
    t = failure_table(summary)
    assert list(t["diverged"]) == ["6/6", "0/6"] and t["why (telemetry, first failure)"][0].endswith("exp_avg_sq")
    (line,) = failure_statement(summary)
    assert "diverged with states/master stored as state=e4m3 (6/6)" in line
    assert "did not diverge with state=e4m3:tensor (0/6)" in line
