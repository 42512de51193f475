"""The experiment lab: configs, content-addressed resumable runs, reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradlab import cli, lab
from gradlab.lab import report as R
from gradlab.lab.runner import run_id, source_fingerprint

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
kind = "descent"
seed = 3
repeats = 1
[descent]
num_steps = 300
tol = 1e-4
points = 20
problem = [{name = "quadratic", dim = 4}]
[[descent.strategy]]
name = "exact"
[[descent.strategy]]
name = "two_point"
num_directions = [1, 2]
"""


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(autouse=True)
def stable_fingerprint(monkeypatch):
    """Hash the source once per test, so that an edit elsewhere in the tree while the suite runs
    cannot invalidate runs between two calls of one test (a real edit must, and does: see
    test_run_ids_are_content_addresses)."""
    import gradlab.lab.runner as runner

    fp = source_fingerprint()
    monkeypatch.setattr(runner, "source_fingerprint", lambda: fp)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in R.TIMING_FIELDS} for r in rows]


# ---------------------------------------------------------------------------------------------
# configs

BAD = [
    (
        {
            "kind": "descent",
            "descent": {"strategy": ["exact", {"name": "two_point", "num_directions": -3}]},
        },
        "descent.strategy[1].num_directions: expected an integer ≥ 1, got -3",
    ),
    ({"kind": "descnt"}, "kind: unknown kind 'descnt'"),
    ({"kind": "descent", "descent": {"problem": ["quadratc"]}}, "Did you mean 'quadratic'?"),
    ({"kind": "descent", "descent": {"tol": -1.0}}, "descent.tol: expected a number > 0, got -1.0"),
    ({"kind": "descent", "descent": {"bogus": 1}}, "descent: unknown key 'bogus'"),
    (
        {"kind": "descent", "descent": {"num_steps": "many"}},
        "descent.num_steps: expected an integer",
    ),
    ({"kind": "descent", "repeats": 0}, "repeats: expected an integer ≥ 1, got 0"),
    ({"kind": "descent", "dtype": "float16"}, "dtype: expected one of 'float64' or 'float32'"),
    (
        {"kind": "descent", "descent": {"optimizer": [{"name": "adam"}]}},
        "descent.optimizer[0].learning_rate: 'theory' is defined for sgd, momentum and nesterov",
    ),
    (
        {
            "kind": "descent",
            "descent": {"strategy": [{"name": "two_point", "distribution": ["sphere", "gauss"]}]},
        },
        "descent.strategy[0].distribution[1]: expected one of",
    ),
    (
        {
            "kind": "descent",
            "descent": {
                "problem": [{"name": "quadratic", "dim": 3}],
                "strategy": [
                    {"name": "two_point", "num_directions": 5, "distribution": "orthogonal"}
                ],
            },
        },
        "at most d = 3",
    ),
    ({"kind": "descent", "gradcheck": {}}, "[gradcheck]: this section is read by kind 'gradcheck'"),
    (
        {"kind": "gradcheck", "gradcheck": {"problem": [{"name": "mds", "num_points": 0}]}},
        "gradcheck.problem[0].num_points: expected an integer ≥ 1, got 0",
    ),
    ({"seed": 1}, "kind: required key missing"),
]


@pytest.mark.parametrize(("data", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_configs_name_the_field(data, expected):
    with pytest.raises(lab.ConfigError) as e:
        lab.parse(data)
    assert expected in str(e.value)


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(lab.ConfigError, match="TOML syntax error"):
        lab.load(write(tmp_path, 'kind = "descent"\n[descent\n'))
    with pytest.raises(lab.ConfigError, match="no such config file"):
        lab.load(tmp_path / "nope.toml")


def test_subgrids_and_defaults(tmp_path):
    cfg = lab.load(write(tmp_path, SMALL))
    specs = cfg.specs()
    # exact + 2 two_point points: the num_directions list does not multiply exact
    assert len(specs) == 3
    assert sum(s["strategy"]["name"] == "exact" for s in specs) == 1
    two = lab.parse(
        {"kind": "descent", "repeats": 2, "descent": {"strategy": ["exact", "two_point"]}}
    )
    assert len(two.specs()) == 4
    resolved = cfg.to_json()
    assert resolved["name"] == "cfg" and resolved["descent"]["optimizer"][0]["learning_rate"] == [
        "theory"
    ]
    assert resolved["descent"]["strategy"][1]["distribution"] == ["sphere"]  # defaults filled in


def test_run_ids_are_content_addresses():
    spec = lab.parse({"kind": "descent"}).specs()[0]
    fp = source_fingerprint()
    assert run_id(spec, fp) == run_id(dict(spec), fp)
    assert run_id(spec, fp) != run_id({**spec, "num_steps": 7}, fp)
    assert run_id(spec, fp) != run_id(spec, fp[:-1] + "x")  # a source edit invalidates
    assert run_id(spec, fp, "0.10.2") != run_id(spec, fp, "0.10.3")  # so does a JAX upgrade


# ---------------------------------------------------------------------------------------------
# runs


def test_sweep_is_reproducible_resumable_and_keys_are_per_axis(tmp_path, monkeypatch):
    # the figures are test_report_files' business: here matplotlib would be most of the time
    monkeypatch.setattr(R, "_draw_png", lambda fig_block, dpi: b"")
    cfg = write(tmp_path, SMALL)
    a = lab.run(cfg, out=tmp_path / "a")
    assert a.ok and a.num_computed == a.num_runs == 3
    rows_a = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {"step", "loss", "gap", "theory_gap", "num_fun_evals", "strategy.num_directions"} <= set(
        rows_a[-1]
    )

    # an unchanged re-run recomputes nothing, does not redraw the report, and does not even build
    # the problems to validate them (the deep checks run only when something must be computed)
    import gradlab.lab.kinds.descent as descent_kind

    calls = []
    real = descent_kind._check_instances
    descent_kind._check_instances = lambda *a: calls.append(a) or real(*a)
    try:
        again = lab.run(cfg, out=tmp_path / "a")
    finally:
        descent_kind._check_instances = real
    assert again.num_computed == 0 and again.num_reused == 3 and not again.rendered
    assert calls == []

    # a lost result is recomputed, and only it; --force recomputes all, bit for bit (but timing)
    victim = next((tmp_path / "a" / "runs").iterdir())
    (victim / "result.json").unlink()
    assert lab.run(cfg, out=tmp_path / "a").num_computed == 1
    assert lab.run(cfg, out=tmp_path / "a", force=True).num_computed == 3
    rows_again = json.loads((tmp_path / "a" / "results.json").read_text())
    assert strip_timing(rows_again) == strip_timing(rows_a)
    assert [r["compile_time"] for r in rows_again] != [r["compile_time"] for r in rows_a]

    # adding a strategy does not change the numbers of the others (keys are folded per axis)
    more = write(
        tmp_path,
        SMALL + '[[descent.strategy]]\nname = "central_difference"\n',
        name="more.toml",
    )
    c = lab.run(more, out=tmp_path / "c")
    rows_c = json.loads((tmp_path / "c" / "results.json").read_text())
    same = [r for r in rows_c if r["strategy"] != "central_difference"]
    assert strip_timing(same) == strip_timing(rows_a)
    assert c.num_runs == 4 and c.num_computed == 4


def test_report_files(tmp_path):
    out = tmp_path / "rep"
    sweep = lab.run(write(tmp_path, SMALL), out=out)
    for name in (
        "results.json",
        "runs.json",
        "env.json",
        "config.json",
        "report.md",
        "report.html",
    ):
        assert (out / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert env["backend"] == "cpu" and env["devices"]["count"] >= 1 and env["x64"] is True
    assert env["jax"] and env["jaxlib"] and env["python"] and "argv" in env
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(figs) == 3 and len(set(figs)) == 3  # steps, evaluations, time
    md = (out / "report.md").read_text()
    assert "theory steps" in md and all(f"figures/{f}" in md for f in figs)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page  # offline
    assert "two_point(num_directions=2)" in sweep.summary

    # re-render from results alone (runs/ is only a cache)
    import shutil

    shutil.rmtree(out / "runs")
    (out / "report.html").unlink()
    again = lab.rerender(out)
    assert (out / "report.html").is_file() and again.num_runs == sweep.num_runs
    assert (out / "report.md").read_text() == md


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        [descent]
        num_steps = 50
        problem = ["quadratic", "mds"]  # mds has no smoothness constant: 'theory' cannot be used
        """,
    )
    out = tmp_path / "o"
    code = cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert code == 1
    runs = json.loads((out / "runs.json").read_text())
    status = {r["spec"]["problem"]["name"]: r for r in runs}
    assert status["quadratic"]["status"] == "ok"
    assert status["mds"]["status"] == "failed" and "smoothness" in status["mds"]["error"]
    assert "Failed runs" in (out / "report.md").read_text()
    assert "1 FAILED" in capsys.readouterr().out


def test_divergence_is_recorded_with_its_step(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        [descent]
        num_steps = 2000
        problem = ["quadratic"]
        optimizer = [{name = "sgd", learning_rate = 10.0}]
        """,
    )
    sweep = lab.run(cfg, out=tmp_path / "o")
    (run,) = json.loads((tmp_path / "o" / "runs.json").read_text())
    assert sweep.ok and run["status"] == "diverged"
    assert 0 < run["summary"]["diverged_step"] < 2000


def test_gradcheck_kind(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "gradcheck"
        [gradcheck]
        problem = ["quadratic", {name = "mds", num_points = [4, 5]}]
        """,
    )
    out = tmp_path / "g"
    sweep = lab.run(cfg, out=out)
    assert sweep.ok and sweep.num_runs == 3
    runs = json.loads((out / "runs.json").read_text())
    assert all(r["summary"]["ok"] for r in runs)
    assert all(r["summary"]["error.reference"] < 1e-10 for r in runs)
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(figs) == 3 and any("num_points-5" in f for f in figs)
    rows = json.loads((out / "results.json").read_text())
    assert {"method", "step", "error"} <= set(rows[0])


@pytest.mark.slow
def test_parallel_jobs_match_serial(tmp_path):
    cfg = write(tmp_path, SMALL)
    lab.run(cfg, out=tmp_path / "serial")
    par = lab.run(cfg, out=tmp_path / "par", jobs=2)
    assert par.num_computed == 3
    a = json.loads((tmp_path / "serial" / "results.json").read_text())
    b = json.loads((tmp_path / "par" / "results.json").read_text())
    assert strip_timing(a) == strip_timing(b)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_validate_and_bad_config_writes_nothing(tmp_path, capsys):
    good = write(tmp_path, SMALL)
    assert cli.main(["validate", str(good)]) == 0
    assert "3 runs" in capsys.readouterr().out
    bad = write(
        tmp_path, SMALL.replace("num_directions = [1, 2]", "num_directions = [1, -3]"), "bad.toml"
    )
    out = tmp_path / "never"
    assert cli.main(["run", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "descent.strategy[1].num_directions[1]: expected an integer ≥ 1, got -3" in err
    assert "Traceback" not in err and not out.exists()


def test_cli_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "kind",
        "descent",
        "gradcheck",
        "least_squares",
        "two_point",
        "num_directions=1",
        "lbfgs",
    ):
        assert word in out


def test_deep_config_errors_before_anything_is_written(tmp_path):
    bad = write(
        tmp_path,
        """
        kind = "descent"
        [descent]
        problem = [{name = "quadratic", dim = 3}]
        strategy = [{name = "two_point", num_directions = 5, distribution = "orthogonal"}]
        """,
    )
    with pytest.raises(lab.ConfigError, match="at most d = 3"):
        lab.run(bad, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_subprocess_exit_2_without_traceback(tmp_path):
    bad = write(tmp_path, 'kind = "descent"\n[descent]\nnum_steps = -1\n')
    proc = subprocess.run(
        [sys.executable, "-m", "gradlab.cli", "run", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "descent.num_steps: expected an integer ≥ 1, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        repeats = 6
        [descent]
        num_steps = 3000
        problem = [{name = "least_squares", dim = 30}]
        strategy = ["exact", "central_difference"]
        """,
    )
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradlab.cli", "run", str(cfg), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((out / "runs").glob("*/result.json")) if (out / "runs").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in (out / "runs").glob("*/result.json")}
    assert 3 <= len(finished) < 12, "the sweep was not killed mid-way"
    for p in (out / "runs").glob("*/result.json"):
        json.loads(p.read_text())  # no corrupt file
    sweep = lab.run(cfg, out=out)
    assert sweep.num_runs == 12 and sweep.num_computed == 12 - len(finished)
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    pytest.importorskip("submitit")
    cfg = write(tmp_path, SMALL)
    a = lab.run(cfg, out=tmp_path / "s", launcher="submitit-local")
    assert a.ok and a.num_computed == 3
    b = lab.run(cfg, out=tmp_path / "l")
    rows_a = json.loads((tmp_path / "s" / "results.json").read_text())
    rows_b = json.loads((tmp_path / "l" / "results.json").read_text())
    assert strip_timing(rows_a) == strip_timing(rows_b) and b.ok


CURV = """
kind = "curvature"
[curvature]
problem = [{name = "quadratic", dim = 6}]
method = ["hutchinson", "xtrace"]
num_matvecs = [6]
top_k = 2
mesh = MESH
"""


def test_curvature_kind_against_dense_hessian(tmp_path):
    out = tmp_path / "c"
    sweep = lab.run(write(tmp_path, CURV.replace("MESH", "false")), out=out)
    assert sweep.ok and sweep.num_runs == 2
    for run in json.loads((out / "runs.json").read_text()):
        s = run["summary"]
        assert s["rel_error"] < 1e-10 and s["std_error"] == 0.0  # n matvecs: the exact trace
        assert s["eig_max_rel_error"] < 1e-8
    assert "Top eigenvalues" in (out / "report.md").read_text()


@pytest.mark.slow
def test_curvature_kind_uses_every_device(tmp_path):
    cfg = CURV.replace("num_matvecs = [6]", "num_matvecs = [4]")
    for mesh in ("false", "true"):
        write(tmp_path, cfg.replace("MESH", mesh), name=f"{mesh}.toml")
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "gradlab.cli",
                "run",
                str(tmp_path / f"{mesh}.toml"),
                "--out",
                str(tmp_path / mesh),
                "--quiet",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {m: json.loads((tmp_path / m / "runs.json").read_text()) for m in ("false", "true")}
    assert [r["summary"]["devices"] for r in runs["true"]] == [8, 8]
    for a, b in zip(runs["false"], runs["true"], strict=True):
        assert abs(a["summary"]["value"] - b["summary"]["value"]) <= 1e-12 * abs(
            a["summary"]["value"]
        )
    env = json.loads((tmp_path / "true" / "env.json").read_text())
    assert env["devices"]["count"] == 8 and "device_count=8" in env["xla_flags"]


def test_remat_kind_measures_recompute_and_plan(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "remat"
        dtype = "float32"
        [remat]
        layers = [2, 4]
        width = 8
        batch = 16
        strategy = ["none", "per_layer", {name = "binomial", snapshots = 1}]
        """,
    )
    out = tmp_path / "r"
    sweep = lab.run(cfg, out=out)
    assert sweep.ok and sweep.num_runs == 6
    runs = {
        (r["spec"]["layers"], r["spec"]["strategy"]["name"]): r["summary"]
        for r in json.loads((out / "runs.json").read_text())
    }
    for L in (2, 4):
        base = runs[(L, "none")]["dot_flops"]
        for name in ("per_layer", "binomial"):
            measured = runs[(L, name)]["dot_flops"] / base
            assert measured > 1.0  # the recompute happened
            assert abs(measured - runs[(L, name)]["plan_flops_ratio"]) < 0.05 * measured
    md = (out / "report.md").read_text()
    assert "Pareto front at L = 4" in md and "memory ∝ L^p" in md
    assert len(list((out / "figures").glob("*.png"))) == 3


def test_admodes_kind_finds_the_crossover(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "admodes"
        dtype = "float32"
        [admodes]
        n = 20
        ms = [5, 10, 20, 40, 80]
        rounds = 1
        """,
    )
    out = tmp_path / "a"
    assert lab.run(cfg, out=out).ok
    runs = json.loads((out / "runs.json").read_text())
    picks = {r["spec"]["m"]: r["summary"]["auto_mode"] for r in runs}
    assert picks == {5: "reverse", 10: "reverse", 20: "forward", 40: "forward", 80: "forward"}
    assert "20 by FLOPs" in (out / "report.md").read_text()
