"""Tests of the metric and reporting layer against small hand-computed examples."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from vega_utils.common import VegaError
from vega_utils.insight.report import (
    aggregate_markdown,
    aggregate_runs,
    classification_metrics,
    format_epoch_line,
    head_f1s,
    metrics_from_predictions_csv,
    plot_confusion,
    plot_curves,
    plot_per_class_f1,
    read_predictions_csv,
    write_predictions_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THREE = ["a", "b", "c"]
# labels / predictions worked out by hand below:
#   class a: true 3, predicted 3, hit 2 -> P 2/3, R 2/3, F1 2/3
#   class b: true 2, predicted 3, hit 2 -> P 2/3, R 1,   F1 0.8
#   class c: true 1, predicted 0, hit 0 -> P 0,   R 0,   F1 0
LABELS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 1, 0]


def assert_png(path):
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    # no temp files left behind by the atomic save
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]


def test_metrics_hand_computed():
    m = classification_metrics(LABELS, PREDS, THREE)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    # weighted precision = (3*2/3 + 2*2/3 + 1*0) / 6 = 5/9: differs from accuracy, as in the reference's "ACC"
    assert m["weighted_precision"] == pytest.approx(5 / 9)
    assert m["weighted_precision"] != pytest.approx(m["accuracy"])
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8 + 0) / 6)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    # everything is plain python and JSON-serialisable
    json.dumps(m)
    assert type(m["weighted_f1"]) is float and type(m["per_class"]["a"]["support"]) is int


def test_metrics_absent_class_and_numpy_input():
    names = ["a", "b", "c", "d"]
    m = classification_metrics(np.array([0, 1, 2, 0]), np.array([0, 1, 1, 0], dtype=np.int32), names)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert len(m["confusion"]) == 4 and m["confusion"][3] == [0, 0, 0, 0]
    assert m["confusion"][2] == [0, 1, 0, 0]
    # b: P 1/2, R 1, F1 2/3; weighted over supports 2, 1, 1
    assert m["weighted_f1"] == pytest.approx((2 * 1 + 1 * 2 / 3 + 0) / 4)
    # macro averages only classes that occur (a, b, c), so the absent d does not count as a zero
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_metrics_reject_bad_input():
    with pytest.raises(VegaError):
        classification_metrics([0, 1], [0], THREE)
    with pytest.raises(VegaError):
        classification_metrics([0, 5], [0, 1], THREE)
    with pytest.raises(VegaError):
        classification_metrics([], [], THREE)


def test_head_f1s():
    scores = head_f1s(LABELS, {"all": PREDS, "t": LABELS, "a": [0] * 6})
    assert scores["all"] == pytest.approx(0.6)
    assert scores["t"] == pytest.approx(1.0)
    # all-'a' predictions: only class a scores, F1 = 2*0.5*1/1.5 = 2/3, weight 3/6
    assert scores["a"] == pytest.approx(0.5 * 2 / 3)


def _write_example_csv(path):
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3],
                      [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]])
    write_predictions_csv(path, ["d1", "d1", "d1", "d2", "d2", "NA"], [0, 1, 2, 0, 1, 0],
                          ["M", "F", "M", "F", "F", "M"], LABELS, PREDS, probs, THREE)
    return probs


def test_predictions_csv_round_trip(tmp_path):
    path = str(tmp_path / "out" / "predictions.csv")
    probs = _write_example_csv(path)
    frame = read_predictions_csv(path)
    assert list(frame.columns) == ["dialogue_id", "utterance_index", "speaker", "label", "prediction",
                                   "p_a", "p_b", "p_c"]
    assert frame["label"].tolist() == ["a", "a", "a", "b", "b", "c"]
    assert frame["prediction"].tolist() == ["a", "a", "b", "b", "b", "a"]
    assert frame["dialogue_id"].tolist()[-1] == "NA"  # stays text, not NaN
    assert frame["utterance_index"].tolist() == [0, 1, 2, 0, 1, 0]
    np.testing.assert_allclose(frame[["p_a", "p_b", "p_c"]].to_numpy(), probs, atol=1e-6)
    assert metrics_from_predictions_csv(path, THREE) == classification_metrics(LABELS, PREDS, THREE)


def test_predictions_csv_errors(tmp_path):
    path = str(tmp_path / "p.csv")
    with pytest.raises(VegaError):
        write_predictions_csv(path, ["d"], [0], ["M"], [0], [0], [[0.5, 0.5]], THREE)
    with pytest.raises(VegaError):
        read_predictions_csv(str(tmp_path / "missing.csv"))
    _write_example_csv(path)
    with pytest.raises(VegaError, match="unknown class"):
        metrics_from_predictions_csv(path, ["a", "b"])


def _epoch_row(epoch, **extra):
    row = {"epoch": epoch, "train_loss": 3.0 / epoch, "test_loss": 3.5 / epoch + 0.1,
           "test_f1_all": 0.5 + 0.01 * epoch, "test_f1_t": 0.45, "test_f1_a": 0.4, "test_f1_v": 0.3,
           "test_accuracy": 0.55}
    row.update(extra)
    return row


def test_plot_curves_full_and_single_epoch(tmp_path):
    rows = [_epoch_row(e, valid_loss=1.0 / e, valid_f1_all=0.5) for e in range(1, 6)]
    full = str(tmp_path / "curves.png")
    plot_curves(rows, full, best_epoch=4)
    assert_png(full)
    single = str(tmp_path / "single.png")
    plot_curves([{"epoch": 1, "train_loss": 2.0, "test_f1_all": 0.4}], single, best_epoch=1)
    assert_png(single)
    empty = str(tmp_path / "empty.png")
    plot_curves([], empty)
    assert_png(empty)


def test_plot_confusion_zero_row(tmp_path):
    path = str(tmp_path / "confusion.png")
    plot_confusion([[2, 1, 0], [0, 0, 0], [1, 0, 3]], THREE, path, title="test")
    assert_png(path)
    with pytest.raises(VegaError):
        plot_confusion([[1, 0], [0, 1]], THREE, path)


def _seed_entry(seed, wf1, acc, wp, mf1, class_f1):
    per_class = {c: {"precision": 0.5, "recall": 0.5, "f1": f, "support": 3} for c, f in zip(THREE, class_f1)}
    return {"seed": seed, "run_dir": f"output/run/seed{seed}",
            "metrics": {"weighted_f1": wf1, "accuracy": acc, "weighted_precision": wp, "macro_f1": mf1,
                        "per_class": per_class}}


SEEDS = [
    _seed_entry(1, 0.60, 0.62, 0.63, 0.55, [0.7, 0.5, 0.2]),
    {"seed": 2, "error": "CUDA out of memory"},
    _seed_entry(3, 0.64, 0.65, 0.66, 0.58, [0.75, 0.55, 0.25]),
    _seed_entry(4, 0.59, 0.60, 0.615, 0.50, [0.65, 0.45, 0.0]),
]


def test_aggregate_runs_statistics():
    agg = aggregate_runs(SEEDS)
    assert agg["n_seeds"] == 3 and agg["seeds"] == [1, 3, 4]
    assert agg["failed"] == [{"seed": 2, "error": "CUDA out of memory"}]
    expected = {"weighted_f1": [0.60, 0.64, 0.59], "accuracy": [0.62, 0.65, 0.60],
                "weighted_precision": [0.63, 0.66, 0.615], "macro_f1": [0.55, 0.58, 0.50],
                "f1_a": [0.7, 0.75, 0.65], "f1_b": [0.5, 0.55, 0.45], "f1_c": [0.2, 0.25, 0.0]}
    assert set(agg["metrics"]) == set(expected)
    for name, values in expected.items():
        arr = np.array(values)
        got = agg["metrics"][name]
        assert got["values"] == pytest.approx(values)
        assert got["mean"] == pytest.approx(arr.mean())
        assert got["std"] == pytest.approx(np.sqrt(((arr - arr.mean()) ** 2).sum() / (len(arr) - 1)))
        assert got["min"] == pytest.approx(arr.min()) and got["max"] == pytest.approx(arr.max())
    assert [r["seed"] for r in agg["per_seed"]] == [1, 3, 4]
    assert agg["per_seed"][1]["run_dir"] == "output/run/seed3"
    json.dumps(agg)


def test_aggregate_single_seed_has_zero_std():
    agg = aggregate_runs([SEEDS[0]])
    assert agg["metrics"]["weighted_f1"]["std"] == 0.0
    assert agg["metrics"]["weighted_f1"]["mean"] == pytest.approx(0.60)


def test_aggregate_markdown_contains_numbers():
    agg = aggregate_runs(SEEDS)
    text = aggregate_markdown(agg, THREE)
    mean_wf1 = 100 * np.mean([0.60, 0.64, 0.59])
    std_wf1 = 100 * np.std([0.60, 0.64, 0.59], ddof=1)
    assert f"{mean_wf1:.2f} ± {std_wf1:.2f}" in text
    assert "| 3 | 64.00 | 65.00 | 66.00 | 58.00 | output/run/seed3 |" in text
    assert "F1 c" in text and "25.00" in text
    assert "seed 2: CUDA out of memory" in text


def test_plot_per_class_f1(tmp_path):
    path = str(tmp_path / "per_class.png")
    plot_per_class_f1(aggregate_runs(SEEDS), THREE, path)
    assert_png(path)
    one = str(tmp_path / "one.png")
    plot_per_class_f1(aggregate_runs([SEEDS[0]]), THREE + ["missing"], one)
    assert_png(one)


def test_format_epoch_line():
    row = _epoch_row(12, train_loss=3.2144, test_loss=3.5, test_f1_all=0.61234, test_f1_t=0.581,
                     test_f1_a=0.4002, test_f1_v=0.3011, test_accuracy=0.615, train_seconds=4.12,
                     eval_seconds=0.61)
    line = format_epoch_line(row)
    assert line == ("epoch  12 | train loss 3.214 | test loss 3.500 | F1 all 61.23 t 58.10 a 40.02 v 30.11"
                    " | acc 61.50 | 4.1s+0.6s")
    best = format_epoch_line(dict(row, valid_f1_all=0.6, valid_loss=1.25, is_best=True))
    assert "valid F1 60.00" in best and "valid loss 1.250" in best and best.endswith("*")
    assert format_epoch_line({"epoch": 1}) == "epoch   1"
