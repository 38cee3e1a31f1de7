"""The evaluation's statistics (t2v.demo.statistics) and figures (t2v.demo.scores): Wilson
intervals, per-video means, Newcombe's paired difference, the paired comparison of two saved
reports, and `python -m t2v.eval demo --compare`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from t2v.demo.classify import classify
from t2v.demo.evaluate import Case, main
from t2v.demo.scores import RATES, compare, from_rows, score
from t2v.demo.statistics import Z95, mean_interval, paired_difference, wilson
from t2v.training.synthetic import Attributes, render

# Coverage of a 95% interval measured over COVERAGE_RUNS simulated experiments: the binomial
# error of that estimate is +-1 point. Score intervals of a binomial oscillate around their
# level with n and p because k is discrete (Wilson's dips to about 0.92-0.93 at some n, p:
# Brown, Cai & DasGupta, Statistical Science 2001; measured here 0.926 at p 0.85, n 100);
# a wrong formula (a sign, a missing correlation term, z of 90%: coverage near 0.90 or 0.99)
# lands outside.
COVERAGE_RUNS = 2000
COVERAGE_RANGE = (0.915, 0.98)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 20), (510, 600)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """The Wilson interval's ends are the p where |k/n - p| equals z standard errors at p."""
    low, high = wilson(k, n)
    p_hat = k / n
    for p in (low, high):
        if 0.0 < p < 1.0:
            assert (p_hat - p) ** 2 == pytest.approx(Z95 ** 2 * p * (1 - p) / n, rel=1e-9)
    assert low <= p_hat <= high
    assert (low == 0.0) == (k == 0) and (high == 1.0) == (k == n)


def test_wilson_covers_at_its_level():
    rng = np.random.default_rng(0)
    for p, n in ((0.85, 100), (0.5, 40), (0.97, 600)):
        k = rng.binomial(n, p, COVERAGE_RUNS)
        covered = np.mean([wilson(int(x), n)[0] <= p <= wilson(int(x), n)[1] for x in k])
        assert COVERAGE_RANGE[0] <= covered <= COVERAGE_RANGE[1], (p, n, covered)


def test_mean_interval():
    values = [1.0, 2.0, 3.0, 4.0, float("nan")]
    mean, low, high = mean_interval(values)
    half = Z95 * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert all(math.isnan(v) for v in mean_interval([float("nan")]))


def test_paired_difference_properties():
    same = [True] * 30 + [False] * 10
    assert paired_difference(same, same)[0] == 0.0
    d, low, high = paired_difference(same, same)
    assert low < 0 < high  # identical runs: no difference, but one is not excluded either
    better = [True] * 40
    d, low, high = paired_difference(same, better)
    assert d == pytest.approx(0.25) and 0 < low < d < high <= 1
    d2, low2, high2 = paired_difference(better, same)  # the other way round: mirrored
    assert (d2, low2, high2) == pytest.approx((-d, -high, -low))
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_paired_difference_covers_at_its_level_and_uses_the_pairing():
    """Correlated pairs (the same videos under two settings mostly agree): Newcombe's interval
    covers the true difference at about 95%, and is narrower than the unpaired one would be
    (the correlation term)."""
    rng = np.random.default_rng(1)
    n, p_first, p_flip_up, p_flip_down = 200, 0.85, 0.08, 0.03
    truth = p_first * (1 - p_flip_down) + (1 - p_first) * p_flip_up - p_first
    covered, widths = 0, []
    for _ in range(COVERAGE_RUNS):
        first = rng.random(n) < p_first
        flip = np.where(first, rng.random(n) < p_flip_down, rng.random(n) < p_flip_up)
        second = first ^ flip
        d, low, high = paired_difference(first, second)
        covered += low <= truth <= high
        widths.append(high - low)
    assert COVERAGE_RANGE[0] <= covered / COVERAGE_RUNS <= COVERAGE_RANGE[1]
    unpaired = 2 * Z95 * math.sqrt(2 * 0.85 * 0.15 / n)
    assert np.mean(widths) < 0.7 * unpaired


def _results(flags):
    a = Attributes("red", "circle", "left", "black")
    good = classify(render(a, np.random.default_rng(0)))
    bad = classify(render(Attributes("blue", "circle", "left", "black"),
                          np.random.default_rng(0)))
    return [(Case(a, i, "trained"), good if f else bad) for i, f in enumerate(flags)]


def _report(results):
    from dataclasses import asdict
    return {"rows": [{"caption": c.attributes.caption, "seed": c.seed, "split": c.split,
                      **asdict(p)} for c, p in results], "scores": score(results)}


def test_score_intervals_and_saved_rows_give_the_same_figures():
    results = _results([True] * 17 + [False] * 3)
    scores = score(results)["trained"]
    assert scores["colour"] == 85.0
    assert scores["interval"]["colour"] == [round(100 * v, 1) for v in wilson(17, 20)]
    saved = json.loads(json.dumps(_report(results)))
    rebuilt = [(Case(a, seed, split), p) for _, seed, split, a, p in from_rows(saved["rows"])]
    assert score(rebuilt) == score(results)


def test_compare_pairs_videos_by_caption_and_seed():
    first = _report(_results([True] * 17 + [False] * 3))
    second = _report(_results([True] * 20))
    difference = compare(first, second)["trained"]
    expected = paired_difference([True] * 17 + [False] * 3, [True] * 20)
    assert difference["colour"] == [round(100 * v, 1) for v in expected]
    assert difference["shape"][0] == 0.0 and difference["videos"] == 20
    other = _report(_results([True] * 19))
    with pytest.raises(Exception, match="different cases"):
        compare(first, other)


def test_eval_cli_compare(tmp_path, capsys):
    """Two runs of `python -m t2v.eval demo` with the same settings: every paired difference
    is 0 (same videos); the report holds intervals and the frame-level figures."""
    common = ["demo", "--set", "tuning", "--split", "heldout", "--seeds", "1", "--steps", "2"]
    first = tmp_path / "a.json"
    assert main([*common, "--json", str(first)]) == 0
    assert main([*common, "--json", str(tmp_path / "b.json"), "--compare", str(first)]) == 0
    out = capsys.readouterr().out
    assert "paired difference from" in out and "colour in every frame" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(RATES) <= set(report["scores"]["heldout"]["interval"])
    assert all(d[0] == 0.0 for k, d in report["difference"]["heldout"].items() if k != "videos")
    assert main([*common, "--split", "trained", "--compare", str(first)]) == 2
    assert "different cases" in capsys.readouterr().err


def test_quality_grid_tables_hold_intervals_and_paired_differences():
    """The grid's markdown: each row's figures with intervals, and every other row's paired
    difference from the default row on the same videos."""
    from t2v.demo.quality_grid import grid_markdown

    default = {**_report(_results([True] * 17 + [False] * 3)), "seconds": 1.0,
               "row": {"name": "default", "label": "the default"}}
    other = {**_report(_results([True] * 20)), "seconds": 2.0,
             "row": {"name": "g9", "label": "guidance 9"}}
    text = grid_markdown([default, other], {})
    expected = [round(100 * v, 1) for v in paired_difference([True] * 17 + [False] * 3,
                                                             [True] * 20)]
    cell = f"{expected[0]:+.1f} ({expected[1]:+.1f}, {expected[2]:+.1f})"
    difference_rows = [line for line in text.splitlines() if line.startswith("| guidance 9")
                       and cell in line]
    assert difference_rows, text
    assert "85.0 (" in text and "colour in every frame" in text
