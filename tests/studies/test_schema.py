"""studies.schema: results.csv / metrics.csv / study.json written and read through one definition."""
import csv
import json
import math

import pytest

from studies import schema as S


def _row(**kw):
    base = dict(run_id="abc123", phase="main", task="gpt", optimizer="adamw", precision="fp8-all", lr=1e-3, seed=2,
                steps=60, steps_done=41, tokens=10496, final_loss=2.5, final_val_loss=math.nan, best_val_loss=3.0,
                diverged=True, diverged_step=41, divergence_reason="nonfinite", divergence_site="optim:exp_avg_sq",
                explanation='a "quoted", comma, text\nwith newline', target_loss=3.1, tokens_to_target=math.inf,
                wall_s=1.5, state_bytes_per_param=2.0, status="diverged", config_json='{"a":1}')
    base.update(kw)
    return S.ResultRow(**base)


def test_columns_are_the_dataclass_fields_in_order():
    assert S.RESULT_COLUMNS[:5] == ("run_id", "phase", "task", "optimizer", "precision")
    assert set(S.RESULT_TYPES) == set(S.RESULT_COLUMNS)
    assert S.RESULT_TYPES["diverged"] == "bool" and S.RESULT_TYPES["diverged_step"] == "int?"
    assert len(S.METRIC_COLUMNS) == len(set(S.METRIC_COLUMNS)) == 7 + 2 * len(S.METRIC_ROLES) + 2


def test_results_roundtrip_types_and_text(tmp_path):
    rows = [_row(), _row(run_id="def456", diverged=False, diverged_step=None, steps=None, status="ok")]
    p = tmp_path / "results.csv"
    S.write_results_csv(p, rows)
    # independent reader: the csv module sees the documented text encoding
    with open(p, newline="") as f:
        raw = list(csv.DictReader(f))
    assert raw[0]["diverged"] == "True" and raw[1]["diverged"] == "False"
    assert raw[1]["diverged_step"] == "" and raw[1]["steps"] == ""
    assert raw[0]["final_val_loss"] == "nan" and raw[0]["tokens_to_target"] == "inf"
    assert float(raw[0]["lr"]) == 1e-3 and raw[0]["explanation"] == rows[0].explanation
    back = S.read_results_csv(p)
    assert back[1].diverged is False and back[0].diverged is True
    assert back[0].diverged_step == 41 and back[1].diverged_step is None and back[1].steps is None
    assert isinstance(back[0].seed, int) and math.isnan(back[0].final_val_loss)
    assert [r.to_dict() for r in back][0]["explanation"] == rows[0].explanation
    df = S.read_results(tmp_path)
    assert df["diverged"].dtype == bool and df["diverged"].tolist() == [True, False]
    assert df["seed"].dtype == "int64" and df["diverged_step"].dtype == "float64"
    assert math.isnan(df["diverged_step"].iloc[1])
    S.write_results_csv(tmp_path / "again.csv", back)
    assert (tmp_path / "again.csv").read_text() == p.read_text()


@pytest.mark.parametrize("column,value", [("diverged", "True"), ("diverged", 1), ("seed", 1.5), ("lr", "0.1"),
                                          ("task", 3), ("steps_done", None)])
def test_format_cell_rejects_wrong_types(column, value):
    with pytest.raises(ValueError, match=column):
        S.format_cell(column, value)


def test_row_with_unknown_or_missing_column_is_refused():
    d = _row().to_dict()
    with pytest.raises(ValueError, match="unknown: \\['extra'\\]"):
        S.format_row({**d, "extra": 1})
    d.pop("status")
    with pytest.raises(ValueError, match="missing: \\['status'\\]"):
        S.format_row(d)
    with pytest.raises(ValueError, match="status"):
        S.format_row(_row(status="done"))


def test_bad_file_is_named_with_its_line(tmp_path):
    p = tmp_path / "results.csv"
    S.write_results_csv(p, [_row(), _row(run_id="x2")])
    text = p.read_text().replace(",True,41,", ",yes,41,", 1)
    p.write_text(text)
    with pytest.raises(ValueError, match=r"results.csv line \d+: .*'diverged'.*True, False"):
        S.read_results_csv(p)
    p.write_text("run_id,task\nx,gpt\n")
    with pytest.raises(ValueError, match="missing"):
        S.read_results_csv(p)
    with pytest.raises(FileNotFoundError, match="precision-sweep run"):
        S.read_results(tmp_path / "nowhere")


def test_truncated_last_row_is_refused(tmp_path):
    p = tmp_path / "results.csv"
    S.write_results_csv(p, [_row(), _row(run_id="x2", explanation="plain")])
    text = p.read_text()
    p.write_text(text[: text.rindex(",diverged,")])  # the last row loses its status and config_json
    with pytest.raises(ValueError, match=r"line 4 lacks column\(s\) status, config_json"):
        S.read_results_csv(p)


def test_metrics_roundtrip_and_errors(tmp_path):
    p = tmp_path / "metrics.csv"
    S.write_metrics_csv(p, [{"step": 0, "tokens": 0, "val_loss": 4.5}, {"step": 1, "tokens": 256, "loss": 4.4}])
    m = S.read_metrics(p)
    assert list(m.columns) == list(S.METRIC_COLUMNS) and (m.dtypes == "float64").all()
    assert m["val_loss"].iloc[0] == 4.5 and math.isnan(m["val_loss"].iloc[1]) and m["tokens"].iloc[1] == 256
    with pytest.raises(ValueError, match="unknown column"):
        S.write_metrics_csv(p, [{"step": 0, "bogus": 1.0}])
    p.write_text("step,tokens\n0,0\n")
    with pytest.raises(ValueError, match="metrics.csv.*missing"):
        S.read_metrics(p)


def test_study_json_is_strict(tmp_path):
    study = {"command": "x", "targets": {"gpt": {"target_loss": math.nan, "rule": "r"}}, "counts": {"n": (1, 2)},
             "optimal_loss": {"convex-l1": float("inf")}}
    S.write_study(tmp_path / "study.json", study)
    text = (tmp_path / "study.json").read_text()

    def refuse(name):
        raise AssertionError(f"bare {name} in study.json")

    data = json.loads(text, parse_constant=refuse)
    assert data["targets"]["gpt"]["target_loss"] is None and data["optimal_loss"]["convex-l1"] is None
    assert data["counts"]["n"] == [1, 2]
    assert S.read_study(tmp_path) == data
    with pytest.raises(ValueError, match="unknown study.json key"):
        S.dumps_study({"target_rule": "x"})
    with pytest.raises(TypeError, match="set"):
        S.dumps_study({"counts": {1, 2}})


def test_study_reader_legacy_nan_and_errors(tmp_path):
    assert S.read_study(tmp_path) == {}
    (tmp_path / "study.json").write_text('{"targets": {"gpt": {"target_loss": NaN}}}')
    assert S.read_study(tmp_path)["targets"]["gpt"]["target_loss"] is None
    (tmp_path / "study.json").write_text("{not json")
    with pytest.raises(ValueError, match="study.json is not valid JSON"):
        S.read_study(tmp_path)
    (tmp_path / "study.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        S.read_study(tmp_path)
