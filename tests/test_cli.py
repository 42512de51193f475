"""The command line: real output, exit codes, and bad input that exits 2 without a traceback."""

import subprocess
import sys
import textwrap

import pytest

from gradlab import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_some_catalog_problems(capsys):
    code, out, _ = run(capsys, "check", "toy_graph", "quadratic")
    assert code == 0
    assert "toy_graph" in out and "quadratic" in out
    assert "ok" in out


def test_list_shows_problems_and_defaults(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "least_squares" in out and "dim=10" in out


def test_unknown_problem_exits_2(capsys):
    code, _, err = run(capsys, "check", "quadratc")
    assert code == 2
    assert "unknown name 'quadratc'" in err and "Did you mean 'quadratic'" in err


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mylosses.py").write_text(
        textwrap.dedent(
            """
            import jax.numpy as jnp

            def loss(x):
                return jnp.sum(x ** 3) + x[0] * x[1]

            def good(x):
                return 3 * x ** 2 + jnp.array([x[1], x[0]])

            def half(x):
                return 0.5 * good(x)

            def dict_loss(p):
                return jnp.sum(p["W"] @ p["b"])

            def int_valued(x):
                return jnp.sum(x).astype(jnp.int32)

            def raises(x):
                raise RuntimeError("my bug")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    yield "mylosses"
    sys.modules.pop("mylosses", None)


def test_check_user_function(capsys, user_module):
    code, out, _ = run(capsys, "check", f"{user_module}:loss", "--at", "[1.0, 2.0]")
    assert code == 0 and "reverse" in out
    code, out, _ = run(
        capsys,
        "check",
        f"{user_module}:loss",
        "--at",
        "[1.0, 2.0]",
        "--reference",
        f"{user_module}:good",
    )
    assert code == 0
    code, out, _ = run(
        capsys,
        "check",
        f"{user_module}:loss",
        "--at",
        "[1.0, 2.0]",
        "--reference",
        f"{user_module}:half",
    )
    assert code == 1
    assert "0.5" in out


def test_check_user_function_with_dict_point(capsys, user_module):
    point = '{"W": [[1.0, 2.0], [3.0, 4.0]], "b": [0.5, -1.0]}'
    code, out, _ = run(capsys, "check", f"{user_module}:dict_loss", "--at", point)
    assert code == 0
    assert "central" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "mylosses:loss"], "--at: a point is required"),
        (["check", "mylosses:loss", "--at", "[1, 2"], "--at: expected JSON"),
        (["check", "mylosses:nope", "--at", "[1.0]"], "has no attribute 'nope'"),
        (["check", "nomodule_xyz:f", "--at", "[1.0]"], "could not import module 'nomodule_xyz'"),
        (["check", "toy_graph", "--at", "[1.0]"], "only used with a MODULE:FUNCTION"),
        # the user's function fails at the point: one line naming it and the point, no traceback
        (["check", "mylosses:dict_loss", "--at", "[1.0, 2.0]"], "mylosses:dict_loss raised"),
        (["check", "mylosses:raises", "--at", "[1.0]"], "RuntimeError: my bug"),
        (["check", "mylosses:loss", "--at", "[1.0, NaN]"], "--at: expected finite numbers"),
        (
            ["check", "mylosses:loss", "--at", "[1.0, 1e39]", "--dtype", "float32"],
            "--at: expected finite numbers in float32",
        ),
        (["check", "mylosses:int_valued", "--at", "[1.0]"], "real floating-point scalar"),
        (
            ["check", "mylosses:loss", "--at", "[1.0, 2.0]", "--reference", "mylosses:raises"],
            "mylosses:raises raised RuntimeError",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, user_module, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_check_user_function_honours_dtype(capsys, user_module):
    code, out, _ = run(
        capsys, "check", f"{user_module}:loss", "--at", "[1.0, 2.0]", "--dtype", "float32"
    )
    assert code == 0 and "float32" in out.splitlines()[0]


def test_report_of_an_unwritable_folder_exits_2(capsys, tmp_path, monkeypatch):
    from gradlab import lab
    from gradlab.lab import runner

    cfg = lab.parse({"kind": "gradcheck", "name": "g", "gradcheck": {"problem": ["quadratic"]}})
    made = lab.run(cfg, out=tmp_path / "g")
    before = (made.out / "report.md").read_text()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(made.out / "figures" / "x.png"))

    monkeypatch.setattr(runner, "_render", read_only)
    code, _, err = run(capsys, "report", str(made.out))
    assert code == 2 and "cannot write the report" in err and "Traceback" not in err
    assert (made.out / "report.md").read_text() == before  # nothing lost
    monkeypatch.setattr(runner.os, "access", lambda *a, **k: False)
    code, _, err = run(capsys, "report", str(made.out))
    assert code == 2 and "not writable" in err


def test_no_traceback_from_the_console_script():
    proc = subprocess.run(
        [sys.executable, "-m", "gradlab", "check", "not_a_problem"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown name 'not_a_problem'" in proc.stderr
    assert "Traceback" not in proc.stderr


def _readme_cli_blocks():
    """The README's ```text blocks that show a `$ gradlab ...` command and its output."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for block in re.findall(r"```text\n(.*?)```", readme, flags=re.S):
        lines = block.rstrip("\n").split("\n")
        if lines[0].startswith("$ gradlab "):
            yield lines[0][len("$ gradlab ") :], lines[1:]


@pytest.mark.parametrize(
    "command", ["list problems", "list strategies", "check quadratc"], ids=lambda c: c
)
def test_readme_shows_the_cli_output(capsys, command):
    """The README quotes these commands' output verbatim (deterministic: no timings, no floats of a
    computation): the quote must be what the CLI prints now (``...`` in the quote elides, as in a
    doctest)."""
    import doctest

    blocks = dict(_readme_cli_blocks())
    assert command in blocks, f"README has no `$ gradlab {command}` block"
    _, out, err = run(capsys, *command.split())
    got = "\n".join(line.rstrip() for line in (out + err).rstrip("\n").split("\n")) + "\n"
    want = "\n".join(line.rstrip() for line in blocks[command]) + "\n"
    assert doctest.OutputChecker().check_output(want, got, doctest.ELLIPSIS), (want, got)


def test_redeliver_interrupts_raises_ctrl_c_in_the_main_thread(monkeypatch):
    """A KeyboardInterrupt that Python could only report as "Exception ignored in ..." (raised in a
    finalizer or a gc callback) is delivered to the main thread again; other errors go to Python's
    default hook."""
    import time
    from types import SimpleNamespace

    from gradlab import _interrupts

    with pytest.raises(KeyboardInterrupt):
        _interrupts.redeliver(SimpleNamespace(exc_value=KeyboardInterrupt()))
        for _ in range(100):  # interrupt_main takes effect at the next bytecode boundary
            time.sleep(0.01)
    seen = []
    monkeypatch.setattr(sys, "__unraisablehook__", seen.append)
    other = SimpleNamespace(exc_value=ValueError("boom"))
    _interrupts.redeliver(other)
    assert seen == [other]
    # inside the context, other errors reach the hook that was installed before it (pytest's, a
    # user's), not Python's default
    mine = []
    monkeypatch.setattr(sys, "unraisablehook", mine.append)
    with _interrupts.redeliver_interrupts():
        sys.unraisablehook(other)
    assert mine == [other] and seen == [other] and sys.unraisablehook == mine.append


def _live_processes_in_group(pgid: int) -> list[str]:
    """``pid state`` of the processes of group ``pgid`` that are not zombies (from /proc: a zombie
    stays listed until init reaps it, which in a container can take a few seconds)."""
    import os

    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            live.append(f"{entry} {state}")
    return live


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_a_parallel_run_cleanly(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) during ``gradlab run --jobs 2``:
    exit 130 with one line and no traceback, the workers gone, every result already written whole."""
    import json
    import os
    import signal
    import time
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "zo_vs_gd.toml"
    out = tmp_path / "out"
    argv = ["-m", "gradlab", "run", str(config), "--out", str(out), "--jobs", "2"]
    # SIGINT restored to its default before exec (a CI job may start with it ignored, which Python
    # would keep); no preexec_fn, whose fork would warn in this multithreaded JAX process
    launch = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        f"os.execv(sys.executable, [sys.executable, *{argv!r}])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launch],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, which the workers join
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("runs/*/result.json")):  # interrupt mid-sweep: once a run is saved
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "gradlab: interrupted" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 30
    while _live_processes_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _live_processes_in_group(proc.pid)  # no worker left behind
    saved = list(out.glob("runs/*/result.json"))
    assert saved and all(isinstance(json.loads(p.read_text()), dict) for p in saved)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
