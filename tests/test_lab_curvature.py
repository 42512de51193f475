"""The curvature kind at init and after training: a tiny MLP classifier through the runner, checked
against its dense Hessian (trace, Lanczos top eigenvalues, the SLQ spectral density and its moments),
and the config errors of the training and point fields."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gradlab import lab
from gradlab.lab import report as R

TINY = """
kind = "curvature"
seed = 1
[curvature]
problem = [{name = "mlp_classifier", hidden = 4, num_samples = 40}]
point = ["init", "trained"]
optimizer = "adam"
learning_rate = 0.05
train_steps = 300
method = ["hutchinson", "xtrace"]
num_matvecs = [8]
top_k = 3
slq_probes = 40
slq_iters = 12
"""


@pytest.fixture(autouse=True)
def stable_fingerprint(monkeypatch):
    """Hash the source once per test (as in test_lab.py): an edit elsewhere in the tree while the
    suite runs must not invalidate runs between two calls of one test."""
    import gradlab.lab.runner as runner

    fp = runner.source_fingerprint()
    monkeypatch.setattr(runner, "source_fingerprint", lambda: fp)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny sweep, run once for the module: (out folder, runs by (point, method))."""
    tmp = tmp_path_factory.mktemp("curv")
    cfg = tmp / "tiny.toml"
    cfg.write_text(textwrap.dedent(TINY))
    out = tmp / "out"
    sweep = lab.run(cfg, out=out)
    assert sweep.ok, sweep.failed
    assert sweep.num_runs == 4  # 2 points × 2 methods × 1 budget
    runs = R.join(
        json.loads((out / "runs.json").read_text()), json.loads((out / "results.json").read_text())
    )  # runs.json has the summaries, results.json the recorded points
    return out, {(r["spec"]["point"], r["spec"]["method"]["name"]): r for r in runs}


def test_training_lowers_the_loss_and_moves_the_hessian(swept):
    _, runs = swept
    init, trained = (
        runs[("init", "hutchinson")]["summary"],
        runs[("trained", "hutchinson")]["summary"],
    )
    assert trained["loss_init"] == init["loss"] == init["loss_init"]
    assert trained["loss"] < 0.7 * init["loss"]
    assert trained["grad_norm"] < 0.2 * init["grad_norm"]
    assert trained["exact_trace"] != pytest.approx(init["exact_trace"], rel=1e-3)
    # the trained point does not depend on the method: every run of a point sees the same Hessian
    for point in ("init", "trained"):
        a, b = runs[(point, "hutchinson")]["summary"], runs[(point, "xtrace")]["summary"]
        assert a["exact_trace"] == b["exact_trace"] and a["loss"] == b["loss"]
    # the recorded training curve goes down from the init loss to the trained loss
    curve = runs[("trained", "hutchinson")]["points"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 300
    assert curve[0]["train_loss"] == pytest.approx(init["loss"], rel=1e-12)
    assert curve[-1]["train_loss"] == pytest.approx(trained["loss"], rel=1e-12)


def test_trace_estimates_and_their_error_bars(swept):
    _, runs = swept
    for run in runs.values():
        s = run["summary"]
        assert s["d"] == 2 * 4 + 4 + 4 * 3 + 3
        assert s["covered"] == (abs(s["value"] - s["exact_trace"]) <= 1.96 * s["std_error"])
        assert s["rel_error"] == pytest.approx(
            abs(s["value"] - s["exact_trace"]) / abs(s["exact_trace"]), rel=1e-12
        )
        assert 0 < s["std_error"] and s["num_matvecs_used"] <= 8
        assert s["lambda_min"] < 0 < s["lambda_max"]  # a non-convex loss
        assert run["timing"]["compile_time"] >= 0 and run["timing"]["seconds"] > 0


def test_lanczos_top_eigenvalues_match_eigh(swept):
    _, runs = swept
    for run in runs.values():
        s = run["summary"]
        got, exact = np.array(s["top_eigenvalues"]), np.array(s["top_eigenvalues_exact"])
        assert got.shape == exact.shape == (3,)
        assert np.all(np.diff(exact) <= 0) and exact[0] == s["lambda_max"]
        np.testing.assert_allclose(got, exact, rtol=1e-9)
        assert s["eig_max_rel_error"] <= 1e-9


def test_slq_density_integrates_to_one_and_its_moments_match_the_dense_spectrum(swept):
    _, runs = swept
    with_spectrum = [k for k, r in runs.items() if "slq_density" in r["summary"]]
    assert sorted(with_spectrum) == [("init", "hutchinson"), ("trained", "hutchinson")]
    for key in with_spectrum:
        s = runs[key]["summary"]
        grid, slq = np.array(s["slq_grid"]), np.array(s["slq_density"])
        dense = np.array(s["dense_density"])
        assert grid.shape == slq.shape == dense.shape == (200,)
        assert np.all(slq >= 0) and np.all(np.diff(grid) > 0)
        assert s["slq_integral"] == pytest.approx(1.0, abs=1e-6)
        assert np.trapezoid(slq, grid) == pytest.approx(s["slq_integral"], rel=1e-12)
        assert s["dense_integral"] == pytest.approx(1.0, abs=1e-6)
        # moments: tr(H^k)/n of the dense spectrum, and the quadrature's unbiased estimates
        lam_mean = s["exact_trace"] / s["d"]
        assert s["dense_moments"][0] == pytest.approx(lam_mean, rel=1e-12)
        # the kernel smoothing keeps the mean: ∫ t ρ = the quadrature's first moment (exactly,
        # up to the trapezoid rule), and the dense smoothed density's mean is tr H / n
        assert s["slq_mean"] == pytest.approx(s["slq_moments"][0], rel=1e-6, abs=1e-9)
        assert np.trapezoid(grid * dense, grid) == pytest.approx(lam_mean, rel=1e-6, abs=1e-9)
        # both densities use the same Gaussian kernel: the variance adds σ² to the second moment
        # (for the SLQ density, the library's kernel: this checks the σ read back from its grid)
        sigma2 = s["slq_sigma"] ** 2
        m2_slq = np.trapezoid(grid**2 * slq, grid) - s["slq_moments"][1]
        m2_dense = np.trapezoid(grid**2 * dense, grid) - s["dense_moments"][1]
        assert m2_slq == pytest.approx(sigma2, rel=1e-3)  # (a difference of two larger moments)
        assert m2_dense == pytest.approx(sigma2, rel=1e-3)
        for k in (0, 1):  # ⟨θ⟩ and ⟨θ²⟩ within 4 standard errors (40 probes)
            err = abs(s["slq_moments"][k] - s["dense_moments"][k])
            assert err <= 4 * s["slq_moments_se"][k], (key, k, err, s["slq_moments_se"][k])
        assert s["slq_moments_se"][0] < 0.5 * abs(lam_mean)  # the bar is informative
        # the dense histogram is a density on the grid's range: its area is 1
        edges, hist = np.array(s["dense_hist_edges"]), np.array(s["dense_hist"])
        assert edges[0] == grid[0] and edges[-1] == grid[-1]
        assert float(np.sum(hist * np.diff(edges))) == pytest.approx(1.0, rel=1e-12)


def test_report_shows_the_points_side_by_side(swept):
    out, _ = swept
    md = (out / "report.md").read_text()
    for text in (
        "## At init vs after training",
        "| problem | point | loss |",
        "Top eigenvalues: Lanczos vs eigh",
        "∫ ρ",
        "tr H² / n",
    ):
        assert text in md, text
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert [f for f in figures if f.endswith("spectral_density.png")] == [
        "curvature-mlp_classifier-hidden-4-num_samples-40-init-spectral_density.png",
        "curvature-mlp_classifier-hidden-4-num_samples-40-trained-spectral_density.png",
    ]
    assert "curvature-training_loss.png" in figures
    for f in figures:
        assert (out / "figures" / f).stat().st_size < 100_000
    # result.json stays small: the densities are 200 points, no Hessian, no eigenvector
    for result in (out / "runs").glob("*/result.json"):
        assert result.stat().st_size < 30_000


BAD = [
    ({"train_steps": 0}, "curvature.train_steps: expected an integer ≥ 1, got 0."),
    (
        {"point": "trainedd"},
        "curvature.point: expected one of 'init', 'random' or 'trained', got 'trainedd'.",
    ),
    (
        {"point": ["init", "trainedd"]},
        "curvature.point[1]: expected one of 'init', 'random' or 'trained', got 'trainedd'.",
    ),
    (
        {"point": "trained", "learning_rate": -0.1},
        "curvature.learning_rate: expected a number > 0, got -0.1.",
    ),
    (
        {"point": "trained", "optimizer": "adamw"},
        "curvature.optimizer: expected one of 'adam' or 'sgd', got 'adamw'.",
    ),
    ({"train_step": 3}, "Did you mean 'train_steps'?"),
    ({"slq_probes": -1}, "curvature.slq_probes: expected an integer ≥ 0, got -1."),
    (
        {"psd": True, "method": ["xtrace"]},
        "curvature.psd: used only by method 'auto' (the other methods ignore it)",
    ),
    ({"psd": "yes"}, "curvature.psd"),
    ({"lanczos_block_size": 0}, "curvature.lanczos_block_size: expected an integer ≥ 1, got 0."),
    (
        {"lanczos_block_size": 2, "top_k": 0},
        "curvature.lanczos_block_size: used only for the top eigenvalues; set curvature.top_k > 0",
    ),
    (
        {"train_steps": 100},
        "curvature.train_steps: used only at point 'trained'; add \"trained\" to curvature.point",
    ),
]


@pytest.mark.parametrize(("section", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_fields_name_the_field(section, expected):
    with pytest.raises(lab.ConfigError) as e:
        lab.parse({"kind": "curvature", "curvature": section})
    assert expected in str(e.value)


def test_point_is_a_sweep_axis_and_training_settings_stay_with_trained_runs():
    cfg = lab.parse(
        {
            "kind": "curvature",
            "curvature": {
                "point": ["init", "trained", "init"],
                "method": ["hutchinson", "auto"],
                "num_matvecs": [10, 30],
                "train_steps": 7,
                "slq_probes": 0,
            },
        }
    )
    specs = cfg.specs()
    assert len(specs) == 2 * 2 * 2  # duplicates in point count once
    assert all("spectrum" not in s for s in specs)  # slq_probes = 0 skips the density
    for s in specs:
        assert ("train" in s) == (s["point"] == "trained")
    assert {s["train"]["steps"] for s in specs if "train" in s} == {7}
    assert lab.parse({"kind": "curvature", "curvature": {"point": "random"}}).section.point == [
        "random"
    ]
    one = lab.parse({"kind": "curvature", "curvature": {"point": ["init", "trained"]}}).specs()
    marked = [(s["point"], s["method"]["name"], s["num_matvecs"]) for s in one if "spectrum" in s]
    assert marked == [("init", "hutchinson", 10), ("trained", "hutchinson", 10)]


def test_diverging_training_is_a_failed_run_that_says_why(tmp_path: Path):
    cfg = tmp_path / "div.toml"
    cfg.write_text(
        textwrap.dedent(
            """
            kind = "curvature"
            [curvature]
            problem = [{name = "mlp", hidden = 3, num_samples = 10}]
            point = "trained"
            optimizer = "sgd"
            learning_rate = 1e8
            train_steps = 50
            method = ["hutchinson"]
            num_matvecs = [4]
            top_k = 0
            slq_probes = 0
            """
        )
    )
    sweep = lab.run(cfg, out=tmp_path / "o")
    assert not sweep.ok and len(sweep.failed) == 1
    assert "training diverged" in sweep.failed[0]["error"]
    assert "lower curvature.learning_rate" in sweep.failed[0]["error"]


def test_psd_lets_auto_use_nystrom_on_a_convex_loss(tmp_path: Path):
    # least squares: H = AᵀA is PSD, so the declaration is true; only auto's specs carry it (the
    # other methods' run ids stay as without it)
    cfg = tmp_path / "psd.toml"
    cfg.write_text(
        textwrap.dedent(
            """
            kind = "curvature"
            repeats = 3
            [curvature]
            problem = [{name = "least_squares", dim = 40, num_samples = 60}]
            method = ["hutchinson", "auto"]
            num_matvecs = [20]
            psd = true
            top_k = 0
            slq_probes = 0
            """
        )
    )
    specs = lab.load(cfg).specs()
    assert {s["method"]["name"]: s.get("psd") for s in specs} == {"hutchinson": None, "auto": True}
    sweep = lab.run(cfg, out=tmp_path / "o")
    assert sweep.ok, sweep.failed
    runs = json.loads((tmp_path / "o" / "runs.json").read_text())
    auto = [r["summary"] for r in runs if r["spec"]["method"]["name"] == "auto"]
    assert len(auto) == 3 and all(np.isfinite(a["value"]) for a in auto)
    assert all(abs(a["value"] - a["exact_trace"]) <= 4 * a["std_error"] + 1e-9 for a in auto)


def test_lanczos_block_size_in_a_config(tmp_path: Path):
    # a config's lanczos_block_size reaches curvature.eigenvalues: the top eigenvalues of least
    # squares' Hessian AᵀA by block Lanczos match eigh; absent from the specs at its default 1
    cfg = tmp_path / "block.toml"
    body = """
        kind = "curvature"
        [curvature]
        problem = [{name = "least_squares", dim = 30, num_samples = 40}]
        method = ["hutchinson"]
        num_matvecs = [10]
        top_k = 4
        lanczos_block_size = 2
        slq_probes = 0
        """
    cfg.write_text(textwrap.dedent(body))
    (spec,) = lab.load(cfg).specs()
    assert spec["lanczos_block_size"] == 2
    sweep = lab.run(cfg, out=tmp_path / "o")
    assert sweep.ok, sweep.failed
    (run,) = json.loads((tmp_path / "o" / "runs.json").read_text())
    s = run["summary"]
    np.testing.assert_allclose(s["top_eigenvalues"], s["top_eigenvalues_exact"], rtol=1e-9)
    cfg.write_text(textwrap.dedent(body.replace("lanczos_block_size = 2", "")))
    assert "lanczos_block_size" not in lab.load(cfg).specs()[0]
