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

import jax
import numpy as np
import pytest

from gradlab import cli, lab
from gradlab._validate import GradlabError
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
        {
            "kind": "descent",
            "descent": {"optimizer": [{"name": "adam", "learning_rate": "theory"}]},
        },
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
        "num_directions = 5 exceeds d = 3",
    ),
    ({"kind": "descent", "gradcheck": {}}, "[gradcheck]: this section is read by kind 'gradcheck'"),
    (
        {"kind": "gradcheck", "gradcheck": {"problem": [{"name": "mds", "num_points": 0}]}},
        "gradcheck.problem[0].num_points: expected an integer ≥ 1, got 0",
    ),
    ({"seed": 1}, "kind: required key missing"),
    # strict numbers: a string or a boolean is not silently a number
    ({"kind": "descent", "descent": {"tol": True}}, "descent.tol: expected a number, got true"),
    ({"kind": "descent", "descent": {"tol": "1e-6"}}, "descent.tol: expected a number, got '1e-6'"),
    # options that do not apply to the optimizer are errors, not silently dropped
    (
        {"kind": "descent", "descent": {"optimizer": {"name": "sgd", "momentum": 0.5}}},
        "descent.optimizer[0].momentum: applies to name = 'momentum' or 'nesterov' only",
    ),
    (
        {"kind": "descent", "descent": {"optimizer": [{"name": "lbfgs", "learning_rate": 0.1}]}},
        "descent.optimizer[0].learning_rate: lbfgs takes no learning rate",
    ),
    (
        {"kind": "descent", "descent": {"optimizer": [{"name": "sgdd"}]}},
        "got 'sgdd'. Did you mean 'sgd'?",
    ),
    ({"kind": "admodes", "admodes": {"ms": [5]}}, "admodes.ms: expected at least 2 values"),
    # caught by `gradlab validate`, not left to fail in the runs
    (
        {"kind": "descent", "descent": {"optimizer": [{"name": "adam"}]}},
        "descent.optimizer[0].learning_rate: required for 'adam'",
    ),
    (
        {
            "kind": "curvature",
            "curvature": {
                "problem": [{"name": "quadratic", "dim": 10}],
                "method": ["xtrace"],
                "num_matvecs": [2, 10],
            },
        },
        "curvature.num_matvecs: method 'xtrace' needs at least 4 matvecs",
    ),
    (
        {
            "kind": "curvature",
            "curvature": {"problem": [{"name": "quadratic", "dim": 10}], "max_dim": 5},
        },
        "curvature.max_dim: problem quadratic has d = 10 parameters > max_dim = 5",
    ),
    (
        {"kind": "remat", "remat": {"layers": [8, 32], "strategy": [{"name": "every_k", "k": 20}]}},
        "remat.strategy[0].k: every_k needs 1 ≤ k ≤ L",
    ),
    (
        {"kind": "descent", "descent": {"strategy": "exact", "problem": "quadratc"}},
        "descent.problem.name: unknown name 'quadratc'",
    ),
]


@pytest.mark.parametrize(("data", "expected"), BAD, ids=[b[1][:40] for b in BAD])
def test_bad_configs_name_the_field(data, expected):
    with pytest.raises(lab.ConfigError) as e:
        lab.parse(data)
    assert expected in str(e.value)


def test_scalar_entries_are_one_entry_lists():
    cfg = lab.parse(
        {
            "kind": "descent",
            "descent": {"problem": "quadratic", "strategy": "exact", "optimizer": "momentum"},
        }
    )
    (spec,) = cfg.specs()
    assert spec["problem"]["name"] == "quadratic" and spec["strategy"] == {"name": "exact"}
    assert spec["optimizer"]["name"] == "momentum"
    cfg = lab.parse({"kind": "gradcheck", "gradcheck": {"problem": "quadratic"}})
    assert [s["problem"]["name"] for s in cfg.specs()] == ["quadratic"]


def test_repeated_axis_values_are_one_run(tmp_path, capsys):
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        [descent]
        problem = [{name = "quadratic", dim = [4, 4, 5]}]
        """,
    )
    assert len(lab.load(cfg).specs()) == 2
    assert cli.main(["validate", str(cfg)]) == 0
    assert ", 2 runs" in capsys.readouterr().out


def test_default_name_from_an_awkward_file_name(tmp_path):
    cfg = lab.load(write(tmp_path, 'kind = "gradcheck"\n', name="my run+lr.toml"))
    assert cfg.name == "my_run_lr"


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
    assert (
        env["backend"] == jax.default_backend()
        and env["devices"]["count"] >= 1
        and env["x64"] is True
    )
    assert env["jax"] and env["jaxlib"] and env["python"] and "argv" in env
    assert env["cpu"]["model"] and isinstance(env["cpu"]["isa"], list)
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert len(figs) == 3 and len(set(figs)) == 3  # steps, evaluations, time
    md = (out / "report.md").read_text()
    assert "theory steps" in md and all(f"figures/{f}" in md for f in figs)
    assert f"({env['cpu']['model']}" in md  # the CPU kind: bit-for-bit holds on the same kind
    # the table's numbers are the runs' own (one repeat: no medians or ranges)
    head, *rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line
    ][:4]
    cells = {r[head.index("strategy")]: dict(zip(head, r, strict=True)) for r in rows}
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == len(cells) == 3
    for run in runs:
        row, summ = cells[run["labels"]["strategy_label"]], run["summary"]
        assert row["steps to tol"] == str(summ["steps_to_tol"])
        assert row["evals to tol"] == str(summ["fun_evals_to_tol"])
        assert float(row["final"]) == pytest.approx(summ["final_gap"], rel=5e-3)
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


def test_theory_step_without_smoothness_is_a_config_error(tmp_path, capsys):
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
    assert cli.main(["validate", str(cfg)]) == 2
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "descent.optimizer[0].learning_rate" in err and "mds" in err and "Traceback" not in err
    assert not out.exists()  # nothing written


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    from gradlab.lab.kinds import descent as descent_kind

    execute = descent_kind.execute

    def flaky(spec):  # a run that fails at execution time (validation cannot foresee it)
        if spec["problem"]["name"] == "mds":
            raise FloatingPointError("simulated failure inside the run")
        return execute(spec)

    monkeypatch.setattr(descent_kind, "execute", flaky)
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        [descent]
        num_steps = 50
        problem = ["quadratic", "mds"]
        optimizer = [{name = "sgd", learning_rate = 0.01}]
        """,
    )
    out = tmp_path / "o"
    code = cli.main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert code == 1
    runs = json.loads((out / "runs.json").read_text())
    status = {r["spec"]["problem"]["name"]: r for r in runs}
    assert status["quadratic"]["status"] == "ok"
    assert status["mds"]["status"] == "failed" and "simulated" in status["mds"]["error"]
    assert "Failed runs" in (out / "report.md").read_text()
    assert "1 FAILED" in capsys.readouterr().out
    # a failed run is retried on the next run (and now succeeds)
    monkeypatch.setattr(descent_kind, "execute", execute)
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert "1 computed, 1 reused" in capsys.readouterr().out


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
    with pytest.raises(lab.ConfigError, match="exceeds d = 3"):
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
        # n matvecs: the exact trace, whose error bar is the rounding floor 2·eps·|value| (covers it)
        assert s["rel_error"] < 1e-10 and 0.0 < s["std_error"] < 1e-13 * abs(s["value"])
        assert s["covered"]
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
    # the tidy table carries the measurements (one row per run), not only the parameters
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 6
    for row in rows:
        summary = runs[(row["layers"], row["strategy"])]
        assert row["memory_bytes"] == summary["memory_bytes"] > 0
        assert row["dot_flops"] == summary["dot_flops"] > 0
    # and a re-render from the folder gives the same report
    lab.rerender(out)
    assert (out / "report.md").read_text() == md


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
    md = (out / "report.md").read_text()
    assert "20 by FLOPs" in md
    rows = json.loads((out / "results.json").read_text())
    assert {r["m"]: r["auto_mode"] for r in rows} == picks
    summaries = {r["spec"]["m"]: r["summary"] for r in runs}
    for r in rows:
        for op in ("forward", "jacfwd", "jacrev", "jacobian"):
            assert r[f"flops.{op}"] == summaries[r["m"]][f"flops.{op}"] > 0
        assert r["clock_used"] == summaries[r["m"]]["clock"] and r["run_time.jacrev"] > 0
    lab.rerender(out)
    assert (out / "report.md").read_text() == md


# ---------------------------------------------------------------------------------------------
# the report folder: what --out may be, file modes, stale runs, runs from another device

TINY = """
kind = "descent"
[descent]
num_steps = 20
points = 5
problem = [{name = "quadratic", dim = [3, 4]}]
"""


def test_out_must_be_a_folder_gradlab_can_own(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.md").write_text("keep me too")
    for out, message in [
        (a_file, "exists and is not a folder"),
        (a_file / "sub", "cannot create it"),
        (foreign, "a non-empty folder that gradlab did not make"),
    ]:
        assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"output folder {str(out)!r} (--out): {message}" in err and "Traceback" not in err
    assert a_file.read_text() == "keep me" and os.listdir(foreign) == ["notes.md"]
    with pytest.raises(GradlabError, match="did not make"):
        lab.run(cfg, out=foreign)


def test_report_files_follow_the_umask_and_stale_runs_are_listed_then_pruned(tmp_path, capsys):
    cfg = write(tmp_path, TINY)
    out = tmp_path / "o"
    first = lab.run(cfg, out=out)
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("report.md", "report.html", "results.json", "env.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    run_file = out / "runs" / next(iter(os.listdir(out / "runs"))) / "result.json"
    assert run_file.stat().st_mode & 0o777 == 0o666 & ~mask
    assert first.stale == ()
    # drop one point: its run folder is stale, listed and kept, then pruned on request
    cfg.write_text(cfg.read_text().replace("dim = [3, 4]", "dim = [3]"))
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert "1 run folder(s) in" in capsys.readouterr().out
    assert len(os.listdir(out / "runs")) == 2
    assert cli.main(["run", str(cfg), "--out", str(out), "--quiet", "--prune"]) == 0
    assert "pruned 1 run folder(s)" in capsys.readouterr().out
    assert len(os.listdir(out / "runs")) == 1


def test_runs_from_another_device_are_recomputed_and_a_bad_env_is_rebuilt(tmp_path):
    import jax

    cfg = write(tmp_path, TINY)
    out = tmp_path / "o"
    lab.run(cfg, out=out)
    rid = sorted(os.listdir(out / "runs"))[0]
    path = out / "runs" / rid / "result.json"
    record = json.loads(path.read_text())
    assert record["device"] == jax.devices()[0].device_kind
    here = record["machine"]
    assert here["backend"] == jax.default_backend() and here["device_count"] == jax.device_count()
    for other in (
        {"device_kind": "some other accelerator"},
        {"device_count": 4},  # a sweep made on 4 devices is not reused on 1
        {"cpu": "another CPU model"},  # its rounding can differ in the last bits
        {"xla_flags": "--xla_force_host_platform_device_count=4"},
    ):
        path.write_text(json.dumps({**record, "machine": {**here, **other}}))
        again = lab.run(cfg, out=out)
        assert (again.num_computed, again.num_reused) == (1, 1), other
        assert json.loads(path.read_text())["machine"] == here
    # an unreadable env.json: `gradlab report` still renders (saying so), a run rewrites it
    (out / "env.json").write_text("{not json")
    lab.rerender(out)
    assert "environment not recorded" in (out / "report.md").read_text()
    lab.run(cfg, out=out)
    assert json.loads((out / "env.json").read_text())["backend"] == jax.default_backend()


def test_summary_counts_runs_that_missed_tol(tmp_path):
    cfg = write(
        tmp_path,
        """
        kind = "descent"
        repeats = 2
        [descent]
        num_steps = 5
        tol = 1e-12
        points = 5
        problem = [{name = "quadratic", dim = 3}]
        """,
    )
    sweep = lab.run(cfg, out=tmp_path / "o")
    assert "not reached (>5)" in sweep.summary
    assert "not reached (>5)" in (tmp_path / "o" / "report.md").read_text()


def test_lab_run_leaves_the_sessions_x64_setting_alone(tmp_path, python_without_x64):
    """Runs execute with x64 enabled, scoped to each run: a session with x64 off (the JAX default)
    that validates and runs a float64 config keeps x64 off, and env.json records what the runs saw."""
    code = textwrap.dedent(
        f"""
        import json, jax
        from gradlab import lab
        assert not jax.config.jax_enable_x64
        cfg = lab.parse({{"kind": "descent", "dtype": "float64", "descent": {{
            "num_steps": 20, "problem": "quadratic", "strategy": "exact",
            "optimizer": {{"name": "sgd", "learning_rate": "theory"}}}}}})
        assert not jax.config.jax_enable_x64, "parse switched x64 on"
        sweep = lab.run(cfg, out={str(tmp_path / "out")!r}, jobs=1)
        assert not sweep.failed and not jax.config.jax_enable_x64, "run switched x64 on"
        assert json.load(open({str(tmp_path / "out" / "env.json")!r}))["x64"] is True
        print("ok")
        """
    )
    python_without_x64(code, timeout=300)


def test_cpu_info_tells_arm_cores_apart_and_survives_no_proc(monkeypatch):
    import builtins
    import io

    from gradlab.lab import runner

    real_open = builtins.open
    arm = (
        "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU part\t: 0xd40\n"
    )

    def fake(text):
        def open_(path, *args, **kwargs):
            if path == "/proc/cpuinfo":
                if text is None:
                    raise OSError("no /proc")
                return io.StringIO(text)
            return real_open(path, *args, **kwargs)

        return open_

    monkeypatch.setattr(builtins, "open", fake(arm))
    info = runner.cpu_info()
    assert "implementer 0x41, part 0xd40" in info["model"] and info["isa"] == ["asimd", "sve"]
    monkeypatch.setattr(builtins, "open", fake(None))
    monkeypatch.setattr(runner.sys, "platform", "linux")
    info = runner.cpu_info()
    assert info["isa"] == [] and info["model"]  # platform.processor() or the machine name


def test_rerender_keeps_point_metrics_named_error(tmp_path):
    """A gradient check's points carry an ``error`` metric, the name a failed run's message has in
    results.json; re-rendering must keep it (a regression: ``gradlab report`` raised KeyError)."""
    cfg = lab.parse({"kind": "gradcheck", "name": "g", "gradcheck": {"problem": ["quadratic"]}})
    made = lab.run(cfg, out=tmp_path / "g")
    before = (made.out / "report.md").read_text()
    rows = json.loads((made.out / "results.json").read_text())
    runs = json.loads((made.out / "runs.json").read_text())
    joined = R.join(runs, rows)
    assert joined and all(p["error"] >= 0 for run in joined for p in run["points"])
    again = lab.rerender(made.out)
    assert again.ok and again.num_computed == 0
    assert (made.out / "report.md").read_text() == before


# --- the folder's integrity (from a review of resumability) ---------------------------------------------


def _small_sweep(tmp_path):
    cfg = write(tmp_path, SMALL)
    out = tmp_path / "s"
    first = lab.run(cfg, out=out)
    assert first.ok and first.num_computed == 3
    return cfg, out


def test_a_result_copied_from_another_run_is_not_reused(tmp_path):
    cfg, out = _small_sweep(tmp_path)
    before = json.loads((out / "runs.json").read_text())
    a, b = (out / "runs" / r["id"] / "result.json" for r in before[:2])
    b.write_text(a.read_text())  # run b's folder now holds run a's record
    again = lab.run(cfg, out=out)
    assert again.num_computed == 1 and again.num_reused == 2
    after = json.loads((out / "runs.json").read_text())
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert [r["summary"] for r in after] == [r["summary"] for r in before]


def test_unchanged_rerun_restores_deleted_figures(tmp_path):
    import shutil

    cfg, out = _small_sweep(tmp_path)
    names = sorted(p.name for p in (out / "figures").iterdir())
    shutil.rmtree(out / "figures")
    again = lab.run(cfg, out=out)
    assert again.num_computed == 0 and again.rendered
    assert sorted(p.name for p in (out / "figures").iterdir()) == names


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("runs.json", "[1, 2]"),
        ("runs.json", "[]"),
        ("runs.json", "{}"),
        ("results.json", '{"a": 1}'),
        ("results.json", "[]"),
        ("config.json", "[]"),
        ("config.json", '{"name": "x"}'),
    ],
)
def test_report_of_malformed_files_exits_2_and_keeps_the_report(tmp_path, capsys, name, text):
    _, out = _small_sweep(tmp_path)
    before = (out / "report.md").read_text()
    (out / name).write_text(text)
    assert cli.main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the results" in err and "Traceback" not in err
    assert (out / "report.md").read_text() == before


def test_config_and_env_are_written_with_the_results(tmp_path, monkeypatch):
    """An edited config whose re-run is interrupted leaves config.json, env.json, results.json and
    runs.json of the previous run together (they were written at the start before)."""
    from gradlab.lab import runner

    _, out = _small_sweep(tmp_path)
    files = {
        n: (out / n).read_text() for n in ("config.json", "env.json", "results.json", "runs.json")
    }
    edited = write(tmp_path, SMALL.replace("tol = 1e-4", "tol = 1e-5"), name="edited.toml")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lab.run(edited, out=out)
    assert {n: (out / n).read_text() for n in files} == files


def test_a_broken_worker_pool_records_the_runs_as_failed(tmp_path, monkeypatch):
    """A worker killed by the system breaks joblib's pool; the runs it did not finish are recorded as
    failed (the report says so, exit 1), and a re-run computes them."""
    import joblib

    cfg = write(tmp_path, SMALL)
    out = tmp_path / "p"

    class Broken:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, tasks):
            raise joblib.externals.loky.process_executor.TerminatedWorkerError(
                "a worker was killed"
            )

    monkeypatch.setattr(joblib, "Parallel", Broken)
    sweep = lab.run(cfg, out=out, jobs=2)
    assert not sweep.ok and len(sweep.failed) == 3
    assert all("worker processes stopped" in f["error"] for f in sweep.failed)
    again = lab.run(cfg, out=out)  # in this process (jobs=1): the failed runs are computed now
    assert again.ok and again.num_computed == 3 and again.num_reused == 0


def test_machine_includes_the_prng_implementation():
    from gradlab.lab import runner

    m = runner._machine()
    assert m["prng_impl"] == str(jax.config.jax_default_prng_impl) and m["numpy"] and m["optax"]
    assert runner.environment([])["prng_impl"] == m["prng_impl"]


def test_gradient_norm_figure_with_its_bound(tmp_path):
    """record_grad_norm draws min ‖∇f‖² against the step beside 2cL(f₀ − f*)/k: c = d for one sphere
    direction, 1 for exact gradients (the seeds' ‖∇f‖² ~ d/k vs 1/k)."""
    from gradlab import theory
    from gradlab.lab.kinds import descent as descent_kind

    cfg = write(tmp_path, SMALL.replace("points = 20", "points = 20\nrecord_grad_norm = true"))
    out = tmp_path / "g"
    sweep = lab.run(cfg, out=out)
    assert sweep.ok
    names = [p.name for p in (out / "figures").iterdir()]
    assert any(n.endswith("grad_norm_vs_steps.png") for n in names)
    assert "Gradient norms (record_grad_norm" in (out / "report.md").read_text()
    runs = R.join(
        json.loads((out / "runs.json").read_text()), json.loads((out / "results.json").read_text())
    )
    curves = {}
    for r in runs:
        curves.setdefault(descent_kind.labels(r["spec"])["strategy"], []).append(r)
    fig = descent_kind._grad_norm_figure("p", "o", curves, {})
    assert fig is not None
    for r in runs:
        s, pts = r["summary"], r["points"]
        assert all(p["grad_norm"] >= 0 for p in pts)
        ks = [p["step"] for p in pts if p["step"] > 0]
        want = s["second_moment"] * theory.gd_grad_norm_bound(
            ks, L=s["L"], gap0=pts[0]["loss"] - s["f_star"]
        )
        # the measured minimum stays below the bound (smooth GD at its theory step)
        best = np.minimum.accumulate([p["grad_norm"] ** 2 for p in pts])[1:]
        assert np.all(best <= want * (1 + 1e-9))


def test_resolved_config_parses_back(tmp_path):
    """config.json (the resolved config) writes null for options an optimizer does not take; parsing
    it again gives the same runs."""
    cfg = lab.parse(
        {
            "kind": "descent",
            "descent": {
                "problem": [{"name": "quadratic", "dim": 3}],
                "optimizer": ["sgd", "lbfgs", {"name": "momentum"}],
            },
        }
    )
    again = lab.parse(cfg.to_json())
    assert again.specs() == cfg.specs()
    opts = cfg.to_json()["descent"]["optimizer"]
    assert [o["momentum"] for o in opts] == [None, None, [0.9]]
    assert opts[1]["learning_rate"] is None


def test_an_error_that_is_not_a_broken_pool_propagates(tmp_path, monkeypatch):
    import joblib

    class Failing:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, tasks):
            raise RuntimeError("a bug, not a dead worker")

    monkeypatch.setattr(joblib, "Parallel", Failing)
    with pytest.raises(RuntimeError, match="a bug"):
        lab.run(write(tmp_path, SMALL), out=tmp_path / "b", jobs=2)
