import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from imgclf import scores

# 3 classes; rows are the true class, columns the predicted one.
CONFUSION = [
    [5, 1, 0],  # a: 6 images, 5 right
    [2, 3, 1],  # b: 6 images, 3 right
    [0, 0, 4],  # c: 4 images, all right
]


def test_class_scores_agree_with_a_hand_computation():
    got = scores.class_scores(CONFUSION, ["a", "b", "c"])
    # a: precision 5/7 (column a holds 5+2), recall 5/6
    a = got["per_class"]["a"]
    assert a["precision"] == pytest.approx(5 / 7)
    assert a["recall"] == pytest.approx(5 / 6)
    assert a["f1"] == pytest.approx(2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6))
    assert a["support"] == 6
    b = got["per_class"]["b"]
    assert (b["precision"], b["recall"], b["support"]) == (pytest.approx(3 / 4), 0.5, 6)
    c = got["per_class"]["c"]
    assert (c["precision"], c["recall"]) == (pytest.approx(4 / 5), 1.0)
    f1 = [got["per_class"][k]["f1"] for k in "abc"]
    assert got["macro_avg"]["f1"] == pytest.approx(sum(f1) / 3)
    assert got["weighted_avg"]["f1"] == pytest.approx((6 * f1[0] + 6 * f1[1] + 4 * f1[2]) / 16)
    assert got["weighted_avg"]["recall"] == pytest.approx(12 / 16)  # = accuracy
    assert got["macro_avg"]["support"] == 16


def test_class_scores_match_scikit_learn_on_random_answers():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 5, 300)  # class 5 is never predicted
    got = scores.class_scores(scores.confusion_matrix(y, p, 6), list("abcdef"))
    for average in ("macro", "weighted"):
        want = precision_recall_fscore_support(y, p, average=average, zero_division=0)
        mine = got[f"{average}_avg"]
        assert [mine["precision"], mine["recall"], mine["f1"]] == pytest.approx(want[:3])
    assert got["per_class"]["f"]["precision"] == 0.0


def test_ece_of_a_hand_made_split():
    # two images at 0.9 (one right), two at 0.6 (both right): |0.9-0.5|/2 + |0.6-1|/2 = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    targets = [0, 1, 0, 1]
    assert scores.ece(probs, targets) == pytest.approx(0.4)
    bins = scores.reliability(probs, targets, bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    assert bins[8]["accuracy"] == 0.5 and bins[8]["confidence"] == pytest.approx(0.9)


def _overconfident(n=2000, classes=5, seed=0):
    """Logits of a ~70%-accurate classifier, multiplied by 4: far more sure than right."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), targets] += 1.5
    return 4 * logits, targets


def test_temperature_scaling_lowers_the_calibration_error_of_an_overconfident_model():
    logits, targets = _overconfident()
    temperature = scores.fit_temperature(logits, targets)
    # x + 1.5 on the true class with unit noise: the true posterior is softmax(1.5 x), so
    # 4 x needs T = 4 / 1.5
    assert temperature == pytest.approx(4 / 1.5, rel=0.1)
    before = scores.ece(scores.softmax(logits), targets)
    after = scores.ece(scores.softmax(logits, temperature), targets)
    assert after < before / 3
    # the argmax (the label) never changes
    assert (scores.softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()
    # and on fresh images from the same model it holds too
    fresh, fresh_targets = _overconfident(seed=1)
    assert scores.ece(scores.softmax(fresh, temperature), fresh_targets) < scores.ece(
        scores.softmax(fresh), fresh_targets
    )


def test_best_f1_thresholds():
    # class 0 is predicted 4 times: at 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (wrong);
    # it has 3 true images. Keeping the top 2: P=1, R=2/3, F1=0.8 (best); all 4: F1=4/7.
    probs = np.array(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]]
    )
    targets = [0, 0, 1, 1, 0, 1, 1]
    thresholds = scores.best_f1_thresholds(probs, targets)
    assert thresholds[0] == pytest.approx(0.8)
    # class 1: predicted at 0.7 (wrong), 0.8, 0.9 (right); 4 true: keeping 2 → F1 4/6, all 3
    # → 4/7: the two most confident
    assert thresholds[1] == pytest.approx(0.8)


def test_predictions_csv_round_trips():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    text = scores.predictions_csv(["a/1.png", "b/2.png"], [0, 0], probs, ["cat", "dog"])
    lines = text.splitlines()
    assert lines[0] == "file,true_label,predicted_label,probability,correct"
    assert lines[1:] == ["a/1.png,cat,cat,0.900000,1", "b/2.png,cat,dog,0.700000,0"]
