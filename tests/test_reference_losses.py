"""Reference losses: the scaling-law fit L(N) = a / N^b + c per domain, its errors, and the files."""

from __future__ import annotations

import json
import math
import random

import pytest

from shear.errors import ShearError
from shear.reference_losses import ScalingFit, fit_reference_losses, fit_scaling_law, load_points

LLAMA2 = [7e9, 13e9, 70e9]  # the sizes the paper fits (LLaMA2 7B/13B/70B)
# (a, b, c) with N in parameters: a Chinchilla-like law, a shallow and a steep one
LAWS = [(406.4, 0.34, 1.69), (5.0, 0.1, 1.0), (60.0, 0.2, 0.7), (1.2e4, 0.5, 1.4)]


def law(a: float, b: float, c: float, n: float) -> float:
    return a / n**b + c


@pytest.mark.parametrize("abc", LAWS)
@pytest.mark.parametrize("sizes", [LLAMA2, [1e8, 4e8, 1.6e9, 6.4e9], [1e8, 3e8, 1e9, 3e9, 1e10, 3e10]])
def test_exact_data_recovers_the_law(abc, sizes):
    a, b, c = abc
    fit = fit_scaling_law(sizes, [law(a, b, c, n) for n in sizes])
    assert isinstance(fit, ScalingFit)
    assert fit.n_points == len(sizes)
    assert fit.rms < 1e-12
    assert fit.b == pytest.approx(b, rel=1e-6)
    assert fit.c == pytest.approx(c, rel=1e-6)
    assert fit.a == pytest.approx(a, rel=1e-5)
    for n in [1.3e9, 2.7e9, *sizes, 1e12]:
        assert fit(n) == pytest.approx(law(a, b, c, n), rel=1e-6)
        assert fit.predict(n) == fit(n)


def test_three_point_exact_case_interpolates():
    # 3 points, 3 parameters: the fit passes through every point and recovers the law
    losses = [2.10, 1.90, 1.80]
    sizes = [1e9, 3e9, 9e9]
    fit = fit_scaling_law(sizes, losses)
    assert fit.rms < 1e-12
    assert [fit(n) for n in sizes] == pytest.approx(losses, rel=1e-12)
    assert fit.b == pytest.approx(math.log(2) / math.log(3), rel=1e-9)  # steps halve per factor 3
    a, b, c = 3.0, 0.25, 1.5
    fit = fit_scaling_law(LLAMA2, [law(a, b, c, n) for n in LLAMA2])
    assert (fit.a, fit.b, fit.c) == pytest.approx((a, b, c), rel=1e-6)


def test_noisy_data_predicts_close_to_the_law():
    rng = random.Random(0)
    a, b, c = 406.4, 0.34, 1.69
    sizes = [1e8, 2e8, 5e8, 1e9, 2e9, 5e9]
    for _ in range(5):
        losses = [law(a, b, c, n) * (1 + rng.gauss(0, 1e-4)) for n in sizes]
        fit = fit_scaling_law(sizes, losses)
        assert 0 < fit.rms < 1e-3
        for n in sizes + [7e8, 3e9]:
            assert fit(n) == pytest.approx(law(a, b, c, n), rel=1e-3)


def test_least_squares_is_optimal_on_noisy_data():
    # no (a, b, c) near the fit does better: perturb each parameter both ways
    sizes = [1e8, 2e8, 5e8, 1e9, 2e9, 5e9]
    losses = [3.10, 2.84, 2.61, 2.44, 2.33, 2.17]
    fit = fit_scaling_law(sizes, losses)

    def sse(a: float, b: float, c: float) -> float:
        return sum((law(a, b, c, n) - y) ** 2 for n, y in zip(sizes, losses, strict=True))

    best = sse(fit.a, fit.b, fit.c)
    assert math.sqrt(best / len(sizes)) == pytest.approx(fit.rms, rel=1e-6)
    for da, db, dc in [(1e-3, 0, 0), (0, 1e-4, 0), (0, 0, 1e-4)]:
        for sign in (1, -1):
            assert sse(fit.a * (1 + sign * da), fit.b * (1 + sign * db), fit.c + sign * dc) >= best


def test_predictions_do_not_depend_on_the_unit_of_n():
    a, b, c = 406.4, 0.34, 1.69
    losses = [
        law(a, b, c, n) * (1 + e) for n, e in zip(LLAMA2 + [30e9], [1e-3, -2e-3, 1e-3, 5e-4], strict=True)
    ]
    sizes = LLAMA2 + [30e9]
    raw = fit_scaling_law(sizes, losses)
    billions = fit_scaling_law([n / 1e9 for n in sizes], losses)
    assert billions.b == pytest.approx(raw.b, rel=1e-9)
    assert billions.c == pytest.approx(raw.c, rel=1e-9)
    assert billions.a == pytest.approx(raw.a / 1e9**raw.b, rel=1e-8)
    for n in (1.3e9, 2.7e9, 20e9, 1e11):
        assert billions(n / 1e9) == pytest.approx(raw(n), rel=1e-9)


def test_equal_steps_at_equal_ratios_hit_the_lower_bound_of_b():
    # equal loss steps per factor of N are a straight line in ln N: the law needs b -> 0
    points = [
        {"params": n, "losses": {"cc": y}} for n, y in zip([1e9, 3e9, 9e9], [2.1, 1.95, 1.8], strict=True)
    ]
    out = fit_reference_losses(points, 3e9)
    assert out["fits"]["cc"]["b"] == pytest.approx(1e-3)
    assert any("edge of the searched range" in w for w in out["warnings"])
    assert any("negative" in w for w in out["warnings"])  # c -> -infinity along that line
    assert out["reference_losses"]["cc"] == pytest.approx(1.95, abs=1e-4)


def test_flat_or_increasing_loss_clamps_a_to_zero():
    fit = fit_scaling_law([1e9, 2e9, 4e9], [2.0, 2.1, 2.2])
    assert fit.a == 0.0
    assert fit.c == pytest.approx(2.1)
    assert fit(1e6) == pytest.approx(2.1)
    fit = fit_scaling_law([1e9, 2e9, 4e9], [2.0, 2.0, 2.0])
    assert fit.a == 0.0 and fit.c == pytest.approx(2.0) and fit.rms == pytest.approx(0.0, abs=1e-15)


def test_repeated_sizes_are_measurements():
    a, b, c = 60.0, 0.2, 0.7
    sizes = [1e9, 1e9, 4e9, 16e9]
    fit = fit_scaling_law(sizes, [law(a, b, c, n) for n in sizes])
    assert fit(2.7e9) == pytest.approx(law(a, b, c, 2.7e9), rel=1e-6)


@pytest.mark.parametrize(
    "sizes, losses, match",
    [
        ([7e9, 13e9], [2.0, 1.9], "underdetermined"),
        ([7e9, 7e9, 13e9], [2.0, 2.0, 1.9], "3 distinct sizes"),
        ([7e9, 13e9, 70e9], [2.0, 1.9], "one loss per size"),
        ([7e9, 13e9, 70e9], [2.0, float("nan"), 1.8], "finite"),
        ([7e9, 13e9, 70e9], [2.0, float("inf"), 1.8], "finite"),
        ([7e9, float("inf"), 70e9], [2.0, 1.9, 1.8], "positive finite"),
        ([7e9, 0.0, 70e9], [2.0, 1.9, 1.8], "positive finite"),
        ([7e9, -13e9, 70e9], [2.0, 1.9, 1.8], "positive finite"),
        ([7e9, "13e9", 70e9], [2.0, 1.9, 1.8], "must be a number"),
        ([7e9, 13e9, 70e9], [2.0, None, 1.8], "must be a number"),
    ],
)
def test_fit_errors(sizes, losses, match):
    with pytest.raises(ShearError, match=match):
        fit_scaling_law(sizes, losses)


def test_predict_rejects_bad_sizes():
    fit = fit_scaling_law(LLAMA2, [2.0, 1.9, 1.8])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ShearError, match="positive finite"):
            fit(bad)


DOMAINS = {"cc": (406.4, 0.34, 1.69), "github": (30.0, 0.2, 0.3), "book": (1.2e4, 0.5, 1.4)}


def _points(sizes, laws=DOMAINS):
    return [{"params": n, "losses": {d: law(*abc, n) for d, abc in laws.items()}} for n in sizes]


def test_reference_losses_both_input_forms():
    sizes = [1e9, 3e9, 7e9, 13e9]
    out = fit_reference_losses(_points(sizes), 2.7e9)
    assert out["target_params"] == 2.7e9
    assert out["sizes"] == sizes
    assert out["warnings"] == []
    assert list(out["reference_losses"]) == list(DOMAINS)
    for d, abc in DOMAINS.items():
        assert out["reference_losses"][d] == pytest.approx(law(*abc, 2.7e9), rel=1e-6)
        assert set(out["fits"][d]) == {"a", "b", "c", "rms"}
        assert out["fits"][d]["b"] == pytest.approx(abc[1], rel=1e-6)
    by_domain = {d: {n: law(*abc, n) for n in reversed(sizes)} for d, abc in DOMAINS.items()}
    other = fit_reference_losses(by_domain, 2.7e9)
    assert other["sizes"] == sizes
    assert other["reference_losses"] == pytest.approx(out["reference_losses"], rel=1e-12)
    # JSON-style string keys for the sizes
    as_json = json.loads(json.dumps(by_domain))
    assert fit_reference_losses(as_json, 2.7e9)["reference_losses"] == pytest.approx(
        out["reference_losses"], rel=1e-12
    )
    json.dumps(out)  # JSON-ready


def test_paper_setting_extrapolates_from_llama2_sizes():
    # the paper fits 7B/13B/70B and evaluates at 1.3B and 2.7B: outside the range, so a warning
    for target in (1.3e9, 2.7e9):
        out = fit_reference_losses(_points(LLAMA2), target)
        assert len(out["warnings"]) == 1 and "extrapolated" in out["warnings"][0]
        for d, abc in DOMAINS.items():
            assert out["reference_losses"][d] == pytest.approx(law(*abc, target), rel=1e-6)
        # a smaller model has a higher reference loss
    small, large = (fit_reference_losses(_points(LLAMA2), t)["reference_losses"] for t in (1.3e9, 2.7e9))
    assert all(small[d] > large[d] for d in DOMAINS)
    above = fit_reference_losses(_points(LLAMA2), 1e11)
    assert "outside the fitted sizes" in above["warnings"][0]


def test_warnings_for_a_loss_that_does_not_decrease():
    points = _points([1e9, 2e9, 4e9])
    for p, y in zip(points, [2.0, 2.1, 2.2], strict=True):
        p["losses"]["flat"] = y
    out = fit_reference_losses(points, 2e9)
    assert any("'flat'" in w and "does not decrease" in w for w in out["warnings"])
    assert out["reference_losses"]["flat"] == pytest.approx(2.1)
    assert out["fits"]["flat"]["a"] == 0.0
    # non-monotone but still decreasing overall: a fit, flagged
    points = _points([1e9, 2e9, 4e9, 8e9])
    for p, y in zip(points, [2.0, 1.8, 1.85, 1.6], strict=True):
        p["losses"]["bumpy"] = y
    out = fit_reference_losses(points, 3e9)
    assert any("'bumpy'" in w and "monotonically" in w for w in out["warnings"])


def test_reference_loss_errors():
    with pytest.raises(ShearError, match="underdetermined"):
        fit_reference_losses(_points([7e9, 13e9]), 2.7e9)
    points = _points(LLAMA2)
    del points[1]["losses"]["github"]
    with pytest.raises(ShearError, match=r"'github' has no loss at size 1\.3e\+10"):
        fit_reference_losses(points, 2.7e9)
    by_domain = {"cc": {1e9: 2.0, 2e9: 1.9, 4e9: 1.8}, "wiki": {1e9: 2.0, 4e9: 1.8}}
    with pytest.raises(ShearError, match=r"'wiki' has no loss at size\(s\) \['2e\+09'\]"):
        fit_reference_losses(by_domain, 2.7e9)
    points = _points(LLAMA2)
    points[2]["losses"]["book"] = float("nan")
    with pytest.raises(ShearError, match="domain 'book'.*finite"):
        fit_reference_losses(points, 2.7e9)
    with pytest.raises(ShearError, match="given by point 0"):
        fit_reference_losses(_points([7e9, 7e9, 13e9, 70e9]), 2.7e9)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ShearError, match="target size"):
            fit_reference_losses(_points(LLAMA2), bad)
    for bad in ([], {}, "points", [{"params": 1e9}], [{"losses": {"cc": 2.0}}], {"cc": 2.0}):
        with pytest.raises(ShearError):
            fit_reference_losses(bad, 2.7e9)
    with pytest.raises(ShearError, match="not a number"):
        fit_reference_losses({"cc": {"7B": 2.0, "13B": 1.9, "70B": 1.8}}, 2.7e9)


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_points_formats(tmp_path):
    a = _write(tmp_path / "a.json", {"params": 1e9, "losses": {"cc": 2.3, "github": 0.9}})
    # what `shear eval --json` prints, plus the model's parameter count
    eval_out = {
        "model": "some/model",
        "data": "data/",
        "seq_len": 128,
        "params": 3e9,
        "domains": {
            "cc": {"loss": 2.1, "perplexity": math.exp(2.1), "tokens": 1000},
            "github": {"loss": 0.8, "perplexity": math.exp(0.8), "tokens": 1000},
        },
    }
    b = _write(tmp_path / "b.json", eval_out)
    no_params = _write(tmp_path / "c.json", {k: v for k, v in eval_out.items() if k != "params"})
    many = _write(
        tmp_path / "many.json",
        {"points": [{"params": 9e9, "losses": {"cc": 2.0, "github": 0.7}}, {**eval_out, "params": 27e9}]},
    )
    points = load_points([a, b, no_params, many], params=[None, None, 6e9, None])
    assert [p["params"] for p in points] == [1e9, 3e9, 6e9, 9e9, 27e9]
    assert points[1]["losses"] == {"cc": 2.1, "github": 0.8}
    assert points[3]["source"].endswith("many.json#0")
    out = fit_reference_losses(points, 2.7e9)
    assert out["sizes"] == [1e9, 3e9, 6e9, 9e9, 27e9]
    assert set(out["reference_losses"]) == {"cc", "github"}
    # a top-level list and a single path work too
    lst = _write(tmp_path / "list.json", [{"params": 1e9, "losses": {"cc": 2.3}}])
    assert load_points([lst])[0]["losses"] == {"cc": 2.3}
    assert load_points(a)[0]["params"] == 1e9


def test_load_points_errors(tmp_path):
    good = _write(tmp_path / "good.json", {"params": 1e9, "losses": {"cc": 2.3}})
    with pytest.raises(ShearError, match="no such file"):
        load_points([tmp_path / "missing.json"])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ShearError, match="not valid JSON"):
        load_points([tmp_path / "broken.json"])
    eval_out = _write(tmp_path / "eval.json", {"model": "m", "domains": {"cc": {"loss": 2.0}}})
    with pytest.raises(ShearError, match="no 'params'"):
        load_points([eval_out])
    cases = {
        "weird.json": {"hello": 1},
        "scalar.json": 3,
        "noloss.json": {"params": 1e9, "domains": {"cc": {"perplexity": 7.0}}},
        "empty.json": {"params": 1e9, "losses": {}},
        "badsize.json": {"params": -5, "losses": {"cc": 2.0}},
        "strloss.json": {"params": 1e9, "losses": {"cc": "2.0"}},
        "nopoints.json": {"points": []},
    }
    for name, obj in cases.items():
        with pytest.raises(ShearError, match=name):
            load_points([_write(tmp_path / name, obj)])
    many = _write(tmp_path / "many.json", {"points": [{"params": 1e9, "losses": {"cc": 2.0}}]})
    with pytest.raises(ShearError, match="several points"):
        load_points([many], params=[3e9])
    with pytest.raises(ShearError, match="one per file"):
        load_points([good], params=[1e9, 2e9])
    with pytest.raises(ShearError, match="no files"):
        load_points([])
