"""Sweeps: content-addressed runs, resumable and parallel, and the report folder they feed.

Each run of a sweep has an id: the SHA-256 of its resolved spec, the fingerprint of gradlab's source (every
``.py`` file of the package, so an edit to a shared helper invalidates the cache too) and the JAX version.
A run writes ``DIR/runs/<id>/result.json`` atomically when it finishes; a re-run skips the runs whose
result is there (``ok`` or ``diverged``; failed runs are retried), so a killed sweep resumes where it
stopped, and ``force=True`` recomputes everything. Runs go through joblib's ``loky`` backend (separate
processes, never fork), or through submitit to a SLURM cluster.

Then the folder gets ``results.json`` (the tidy table: one row per run and recorded point),
``config.json`` (the resolved config), ``env.json`` (versions, backend, devices, flags, git commit,
argv), ``report.md``, ``report.html`` and ``figures/``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from gradlab._interrupts import redeliver_interrupts
from gradlab._validate import GradlabError, check_choice, check_positive_int
from gradlab.lab import report as R
from gradlab.lab.kinds import Resolved
from gradlab.lab.kinds import get as get_kind
from gradlab.lab.kinds._common import canonical

__all__ = [
    "Sweep",
    "cpu_info",
    "environment",
    "load_runs",
    "rerender",
    "run",
    "run_id",
    "source_fingerprint",
]

LAUNCHERS = ("local", "submitit", "submitit-local")
FINISHED = ("ok", "diverged")


def source_fingerprint() -> str:
    """SHA-256 over every ``.py`` file of the installed gradlab package (relative path and bytes): part
    of every :func:`run_id`, so a change to any of gradlab's code recomputes the runs (a stale cache
    never passes for a fresh result).

    >>> fp = source_fingerprint()
    >>> len(fp), fp == source_fingerprint()
    (64, True)

    Reference: benchopt's cache, which keys on the benchmark's files (Moreau et al., NeurIPS 2022).
    """
    import gradlab

    root = Path(gradlab.__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_id(spec: Mapping[str, Any], fingerprint: str, jax_version: str | None = None) -> str:
    """The content address of a run: 16 hex digits of SHA-256(spec, source fingerprint, JAX version).

    >>> run_id({"kind": "descent"}, "abc", "0.10.2") == run_id({"kind": "descent"}, "abc", "0.10.2")
    True
    >>> run_id({"kind": "descent"}, "abc", "0.10.2") == run_id({"kind": "descent"}, "abd", "0.10.2")
    False
    """
    jax_version = jax_version if jax_version is not None else _version("jax")
    text = canonical({"spec": spec, "gradlab": fingerprint, "jax": jax_version})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    import gradlab

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(gradlab.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        # dirty: the package's own files differ from the commit (not, e.g., the report folders a
        # sweep is writing into the same checkout, which made every committed report '-dirty')
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=Path(gradlab.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """The host CPU's model and the vector extensions XLA's CPU backend compiles for (from
    ``/proc/cpuinfo`` on Linux, with the implementer and part numbers on ARM; ``sysctl`` on macOS;
    else :func:`platform.processor`). Recorded because results are
    bit-for-bit reproducible on the same kind of CPU, not across them: XLA generates code for the
    host's instruction set, and e.g. its vectorised ``pow``/``exp`` differ in the last bit between
    AVX2 and AVX-512.

    >>> sorted(cpu_info())
    ['isa', 'model']
    """
    model, flags, arm = None, set(), {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if model is None and key in ("model name", "hardware", "cpu model"):
                    model = value.strip() or None
                elif not flags and key in ("flags", "features"):
                    flags = set(value.split())
                elif key in ("cpu implementer", "cpu part") and key not in arm:
                    arm[key] = value.strip()  # ARM Linux names no model: these tell the cores apart
                if model is not None and flags:
                    break
    except OSError:
        pass
    if model is None and arm:
        model = f"{platform.machine()} (implementer {arm.get('cpu implementer', '?')}, part " + (
            f"{arm.get('cpu part', '?')})"
        )
    if model is None and sys.platform == "darwin":
        try:
            model = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=False,
                ).stdout.strip()
                or None
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "isa": [f for f in _ISA_FLAGS if f in flags],
    }


def environment(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """What a reader needs to trust or reproduce a report: versions, backend, devices, precision flags,
    ``XLA_FLAGS``, the git commit, the CPU (:func:`cpu_info`) and the command line (``env.json``).

    >>> import jax
    >>> env = environment(["gradlab", "run", "configs/quickstart.toml"])
    >>> env["backend"] == jax.default_backend(), env["jax"] == jax.__version__, env["argv"][1]
    (True, True, 'run')

    Reference: the JAX documentation, "Default dtypes and the X64 flag" and ``jax.devices``; the
    benchopt and MLPerf practice of publishing the software and hardware with every result.
    """
    import jax

    import gradlab

    devices = jax.devices()
    return {
        "gradlab": gradlab.__version__,
        "gradlab_fingerprint": source_fingerprint(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "optax": _version("optax"),
        "backend": jax.default_backend(),
        "devices": {
            "count": len(devices),
            "kinds": sorted({d.device_kind for d in devices}),
            "platform": devices[0].platform if devices else None,
        },
        "x64": bool(jax.config.jax_enable_x64),
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_info(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": list(argv) if argv is not None else list(sys.argv),
    }


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, NumPy scalars Python numbers."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, *, compact: bool = False) -> str:
    """JSON text (strict: no NaN); ``compact`` writes one line per list item for big tables."""
    obj = _clean(obj)
    if compact and isinstance(obj, list):
        items = ",\n".join(json.dumps(o, allow_nan=False, separators=(",", ":")) for o in obj)
        return "[\n" + items + "\n]\n"
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"


@functools.cache  # fixed for a process: read once, not per run
def _machine() -> dict[str, Any]:
    """What a finished run must share with this process to be reused: the backend, the device kind
    and count (a sweep run on 4 devices is not reused on 1), ``XLA_FLAGS``, on the CPU backend the
    CPU model (XLA compiles for the host's vector extensions; rounding can differ), JAX's default PRNG
    implementation, and the numpy and optax versions (JAX's is in the run id)."""
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu": cpu_info()["model"] if jax.default_backend() == "cpu" else None,
        # every random draw depends on it (JAX_DEFAULT_PRNG_IMPL: threefry2x32, rbg, ...)
        "prng_impl": str(jax.config.jax_default_prng_impl),
        "numpy": _version("numpy"),
        "optax": _version("optax"),
    }


def _execute_one(kind_name: str, spec: Mapping[str, Any], rid: str, path: str) -> dict[str, Any]:
    """Run one spec and write its result atomically; top-level so that loky can pickle it."""
    import jax

    kind = get_kind(kind_name)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"id": rid, "spec": dict(spec)}
    try:
        # runs take their precision from the config's dtype: x64 is on for the run only (scoped, so
        # a Python session that calls lab.run keeps its own setting); a Ctrl-C that lands in one of
        # JAX's gc callbacks stops the run (in a worker too) instead of printing a traceback
        with jax.enable_x64(True), redeliver_interrupts():
            result = kind.execute(spec)
        record.update(result)
        record.setdefault("error", None)
        if hasattr(kind, "labels"):
            record["labels"] = {f"{k}_label": v for k, v in kind.labels(spec).items()}
    except Exception as e:  # a failing run is recorded, the sweep goes on
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        record.update(_failure(f"{type(e).__name__}: {e}", "".join(tb[-6:])))
    record["seconds"] = time.perf_counter() - t0
    return _write_record(record, path)


def _execute_in_worker(
    kind_name: str, spec: Mapping[str, Any], rid: str, path: str
) -> dict[str, Any]:
    """:func:`_execute_one` in a worker process, which leaves Ctrl-C to the main process: a terminal
    sends SIGINT to the whole process group, and a worker interrupted between two of its own steps
    (or in one of JAX's gc callbacks) would print a traceback of its own; the main process stops the
    sweep and joblib terminates the workers."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return _execute_one(kind_name, spec, rid, path)


def _failure(error: str, tb: str = "") -> dict[str, Any]:
    return {
        "status": "failed",
        "error": error,
        "traceback": tb,
        "summary": {},
        "points": [],
        "timing": {},
    }


def _write_record(record: dict[str, Any], path: str) -> dict[str, Any]:
    """Stamp ``record`` with the machine and write it atomically to ``path``; return its status."""
    import jax

    record["backend"] = jax.default_backend()
    record["device"] = jax.devices()[0].device_kind
    record["machine"] = _machine()
    R.atomic_write(path, json.dumps(_clean(record), allow_nan=False, separators=(",", ":")))
    return {"id": record["id"], "status": record["status"], "error": record.get("error")}


def _stamp(path: str) -> tuple[int, int] | None:
    """The inode and modification time of ``path`` (None if absent): :func:`R.atomic_write` replaces
    a file, so a changed stamp means it was written since."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _record_broken_pool(
    todo: Sequence[tuple[str, Mapping[str, Any], str]],
    before: Mapping[str, tuple[int, int] | None],
    e: Exception,
) -> None:
    """After the process pool broke (a worker was killed: out of memory, a signal), record every run of
    ``todo`` whose result file was not written during the sweep (its stamp unchanged since
    ``before``) as failed, so the sweep's report says so; a re-run computes them again."""
    for rid, spec, path in todo:
        stamp = _stamp(path)
        if stamp is not None and stamp != before.get(path):
            continue  # finished before the pool broke
        error = (
            f"not computed: the sweep's worker processes stopped ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); a worker killed by the system (out of "
            "memory?) or a signal. Run the sweep again to compute it (with fewer --jobs if memory ran out)."
        )
        _write_record({"id": rid, "spec": dict(spec), **_failure(error), "seconds": 0.0}, path)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What :func:`run` did: the folder, the runs (total, computed now, reused), failures, the files."""

    out: Path
    num_runs: int
    num_computed: int
    num_reused: int
    failed: list[dict[str, Any]]
    files: dict[str, Path]
    summary: str
    rendered: bool
    stale: tuple[Path, ...] = ()  # run folders of no point of this config (left, or pruned)
    pruned: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


def load_runs(out: Path, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The run records ``out/runs/<id>/result.json`` of ``ids``, in that order (each a dict with id,
    spec, status, summary, points, timing, machine ...; what a kind's ``report`` reads).

    >>> import json, tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> (out / "runs" / "abc").mkdir(parents=True)
    >>> _ = (out / "runs" / "abc" / "result.json").write_text(json.dumps({"id": "abc", "status": "ok"}))
    >>> load_runs(out, ["abc"])
    [{'id': 'abc', 'status': 'ok'}]
    """
    runs = []
    for rid in ids:
        p = out / "runs" / rid / "result.json"
        runs.append(json.loads(p.read_text()))
    return runs


def _read_finished(path: Path, rid: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The result at ``path`` if it is there, readable, finished (ok or diverged) and the record of
    run ``rid`` with ``spec`` (a file copied from another run folder is not), else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") not in FINISHED:
        return None
    if record.get("id") != rid or not isinstance(record.get("spec"), dict):
        return None
    if canonical(record["spec"]) != canonical(_clean(dict(spec))):  # as written (inf → null)
        return None
    needed = ("summary", "points", "machine")
    return record if all(k in record for k in needed) else None


def _clear_temp(out: Path) -> None:
    """Remove the temporary files of atomic writes that an interrupted process left behind."""
    for pattern in (".tmp-*", "runs/*/.tmp-*", "figures/.tmp-*"):
        for tmp in out.glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _launch(
    kind_name: str,
    todo: Sequence[tuple[str, Mapping[str, Any], str]],
    *,
    jobs: int,
    launcher: str,
    out: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    done: list[dict[str, Any]] = []
    if not todo:
        return done
    with _progress(len(todo), progress) as bar:
        task = bar.add_task(f"{kind_name} runs", total=len(todo))
        if launcher.startswith("submitit"):
            try:
                import submitit
            except ImportError:
                raise GradlabError(
                    "--launcher submitit: the submitit package is not installed; "
                    "pip install 'gradlab[slurm]' (or pip install submitit)."
                ) from None
            folder = out / "submitit"
            if launcher == "submitit-local":
                executor = submitit.LocalExecutor(folder=folder)
                executor.update_parameters(timeout_min=60)
            else:
                executor = submitit.AutoExecutor(folder=folder)
            jobs_ = executor.map_array(
                _execute_one,
                [kind_name] * len(todo),
                [t[1] for t in todo],
                [t[0] for t in todo],
                [t[2] for t in todo],
            )
            for job in jobs_:
                done.append(job.result())
                bar.advance(task)
        elif jobs == 1:
            for rid, spec, path in todo:
                done.append(_execute_one(kind_name, spec, rid, path))
                bar.advance(task)
        else:
            import jax
            from joblib import Parallel, delayed

            if jax.default_backend() != "cpu":
                # each worker is a process of its own: by default JAX would preallocate 75% of the
                # accelerator's memory in every one of them (the workers read this when they start)
                os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
            parallel = Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")
            from joblib.externals.loky.process_executor import (
                BrokenProcessPool,
                TerminatedWorkerError,
            )

            before = {path: _stamp(path) for _, _, path in todo}
            try:
                for res in parallel(
                    delayed(_execute_in_worker)(kind_name, spec, rid, path)
                    for rid, spec, path in todo
                ):
                    done.append(res)
                    bar.advance(task)
            except (TerminatedWorkerError, BrokenProcessPool) as e:  # a worker died; a run's own
                _record_broken_pool(todo, before, e)  # errors are recorded by _execute_one
    return done


def _plain_table(table: R.Table, max_rows: int = 40) -> str:
    """The table as aligned text; columns with one value in every row (of ≥ 2 rows) are shown once
    above it, so the terminal table stays narrow."""
    rows = [[str(c) for c in r] for r in table.rows[:max_rows]]
    header = [str(h) for h in table.header]
    common = []
    if len(rows) > 1:
        keep = [j for j in range(len(header)) if len({r[j] for r in rows}) > 1 or j == 0]
        common = [f"{header[j]}: {rows[0][j]}" for j in range(len(header)) if j not in keep]
        header = [header[j] for j in keep]
        rows = [[r[j] for j in keep] for r in rows]
    widths = [max(len(header[j]), *(len(r[j]) for r in rows)) for j in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if len(table.rows) > max_rows:
        lines.append(f"... ({len(table.rows) - max_rows} more rows in the report)")
    if common:
        lines = ["; ".join(common), "", *lines]
    return "\n".join(lines)


def _figures_present(out: Path) -> bool:
    """Whether every figure that ``report.md`` links to is in ``out/figures``."""
    import re

    try:
        text = (out / "report.md").read_text()
    except OSError:
        return False
    names = re.findall(r"\]\(figures/([^)\s]+)\)", text)
    return all((out / "figures" / name).is_file() for name in names)


def _is_report_folder(out: Path) -> bool:
    """Whether ``out`` holds what :func:`run` writes first (``config.json``) or its ``runs/``."""
    return (out / "config.json").is_file() or (out / "runs").is_dir()


def _where(out: Path) -> str:
    return f"output folder {str(out)!r} (--out)"


def _check_out(out: Path) -> None:
    """Raise :class:`GradlabError` (naming ``--out``) if ``out`` is a file, or a non-empty folder that
    gradlab did not make (whose files a report would overwrite or delete); writes nothing."""
    if out.exists() and not out.is_dir():
        raise GradlabError(f"{_where(out)}: exists and is not a folder; give a folder path.")
    if out.is_dir() and any(out.iterdir()) and not _is_report_folder(out):
        raise GradlabError(
            f"{_where(out)}: a non-empty folder that gradlab did not make (no config.json or runs/ "
            "in it); a report writes report.md, report.html, figures/ and runs/ there. Choose a new "
            "or empty folder."
        )


def _prepare_out(out: Path) -> None:
    """:func:`_check_out`, then create ``out`` (raising if it cannot be created or written)."""
    _check_out(out)
    where = _where(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradlabError(
            f"{where}: cannot create it ({e.strerror or e}); choose a writable path."
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise GradlabError(f"{where}: not writable; choose a writable path.")


def _read_env(path: Path) -> dict[str, Any] | None:
    """``env.json`` at ``path``, or None if it is missing or unreadable."""
    try:
        env = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return env if isinstance(env, dict) else None


def _stale_runs(runs_dir: Path, ids: Sequence[str]) -> list[Path]:
    """Run folders under ``runs_dir`` that belong to no run of the current sweep."""
    if not runs_dir.is_dir():
        return []
    keep = set(ids)
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name not in keep)


def _failures(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"id": r["id"], "status": r["status"], "error": r.get("error")}
        for r in runs
        if r["status"] not in FINISHED
    ]


def _render(out: Path, resolved_json: Mapping[str, Any], runs: Sequence[Mapping], env: Mapping):
    kind = get_kind(resolved_json["kind"])
    good = [r for r in runs if r["status"] in FINISHED]
    failures = [r for r in runs if r["status"] not in FINISHED]
    blocks = kind.report(good, resolved_json) if good else []
    files = R.render(
        out,
        title=f"gradlab report: {resolved_json['name']} ({resolved_json['kind']})",
        blocks=blocks,
        env=env,
        config=resolved_json,
        failures=failures,
    )
    tables = [b for b in blocks if isinstance(b, R.Table)]
    summary = _plain_table(tables[0]) if tables else "(no finished runs)"
    return files, summary


def run(
    config: Any,
    *,
    out: str | Path | None = None,
    jobs: int = 1,
    force: bool = False,
    launcher: str = "local",
    progress: bool = False,
    argv: Sequence[str] | None = None,
    prune: bool = False,
) -> Sweep:
    """Run the sweep of ``config`` (a path or a :class:`~gradlab.lab.kinds.Resolved`) into ``out``.

    Args:
      config: a TOML path or an already validated config.
      out: the report folder (default ``gradlab-runs/<name>``).
      jobs: runs at once (joblib loky processes); 1 runs in this process.
      force: recompute finished runs.
      launcher: ``"local"`` (joblib), ``"submitit"`` (SLURM, or local if no cluster), or
        ``"submitit-local"`` (submitit's local executor).
      progress: show a progress bar with ETA on stderr.
      argv: the command line recorded in ``env.json`` (default ``sys.argv``).
      prune: delete the run folders under ``out/runs`` that belong to no run of this config (left
        by earlier versions of it); by default they are kept and listed in ``Sweep.stale``.

    A finished run is reused only if its record is the run's own (its id and spec) and it was computed
    on the same kind of machine (:func:`_machine`: backend, device kind and count, ``XLA_FLAGS``, on
    the CPU backend the CPU model, JAX's default PRNG implementation, numpy and optax versions);
    others are recomputed here (their timings, and possibly their rounding, belong to another
    machine). ``config.json`` and ``env.json`` are written with ``results.json`` and ``runs.json`` at
    the end, so an interrupted re-run leaves the previous four together; if the process pool of
    ``jobs > 1`` breaks (a worker killed, e.g. out of memory), the unfinished runs are recorded as
    failed and the report is written.

    Returns: a :class:`Sweep`. Raises ``ConfigError`` before anything is written for a bad config, and
    :class:`GradlabError` if ``out`` is a file, not writable, or a non-empty folder that gradlab did
    not make.

    Each run is content-addressed (:func:`run_id`: its spec, gradlab's source and JAX's version) and
    written atomically to ``out/runs/<id>/result.json``, so an interrupted sweep resumes where it
    stopped and a finished one is reused:

    >>> import pathlib, tempfile
    >>> from gradlab import lab
    >>> cfg = lab.parse({"kind": "descent", "name": "doc", "descent": {
    ...     "num_steps": 200, "tol": 1e-6, "problem": [{"name": "quadratic", "dim": 4}],
    ...     "strategy": [{"name": "exact"}, {"name": "central_difference"}]}})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     first = lab.run(cfg, out=pathlib.Path(d) / "doc")
    ...     again = lab.run(cfg, out=pathlib.Path(d) / "doc")
    ...     files = sorted(p.name for p in first.out.iterdir())
    >>> first.ok, first.num_runs, first.num_computed, again.num_reused, again.num_computed
    (True, 2, 2, 2, 0)
    >>> [f for f in files if f.startswith(("report", "results", "env", "config"))]
    ['config.json', 'env.json', 'report.html', 'report.md', 'results.json']

    Reference: benchopt (Moreau et al., NeurIPS 2022), whose cache and resumable runs this follows;
    joblib's ``Parallel`` (loky backend) for ``jobs > 1``; submitit for SLURM.
    """
    from gradlab.lab.config import load, raise_errors

    resolved = config if isinstance(config, Resolved) else load(config, deep=False)
    jobs = check_positive_int("jobs", jobs)
    check_choice("launcher", launcher, LAUNCHERS)
    specs = resolved.specs()
    fingerprint = source_fingerprint()
    jax_version = _version("jax")
    ids = [run_id(s, fingerprint, jax_version) for s in specs]
    unique = dict(zip(ids, specs, strict=True))
    out = Path(out) if out is not None else Path("gradlab-runs") / resolved.name
    if out.is_dir() and _is_report_folder(out):
        _clear_temp(out)
    _check_out(out)  # before any work
    runs_dir = out / "runs"
    cached = (
        {}
        if force
        else {
            rid: _read_finished(runs_dir / rid / "result.json", rid, s) for rid, s in unique.items()
        }
    )
    if any(r is not None for r in cached.values()):
        import jax

        here = _machine()
        cached = {rid: r for rid, r in cached.items() if r is not None and r.get("machine") == here}
    todo = [
        (rid, spec, str(runs_dir / rid / "result.json"))
        for rid, spec in unique.items()
        if cached.get(rid) is None
    ]
    kind_name = resolved.kind.NAME
    if todo and not resolved.checked and hasattr(resolved.kind, "check_instances"):
        # before anything is written: a bad config leaves no folder behind
        raise_errors(
            resolved.kind.check_instances(resolved.section, resolved.experiment), resolved.source
        )
    resolved_json = resolved.to_json()
    _prepare_out(out)
    runs_dir.mkdir(exist_ok=True)  # marks the folder as gradlab's from the start (resumable)
    env_path = out / "env.json"
    env = None if todo else _read_env(env_path)
    if env is None:
        import jax

        with jax.enable_x64(True):  # what the runs see (see _execute_one)
            env = environment(argv)
    _launch(kind_name, todo, jobs=jobs, launcher=launcher, out=out, progress=progress)
    # results read above are reused; only the runs computed now are read back
    fresh_ids = [t[0] for t in todo]
    done = dict(zip(fresh_ids, load_runs(out, fresh_ids), strict=True))
    runs = [cached.get(rid) or done[rid] for rid in unique]
    rows = R.tidy(runs)
    results_text = dumps(rows, compact=True)
    runs_text = dumps(R.run_rows(runs), compact=True)
    stamp = hashlib.sha256(
        (results_text + canonical(resolved_json) + fingerprint).encode()
    ).hexdigest()
    stamp_path = out / ".report-stamp"
    fresh = (
        not todo
        and stamp_path.exists()
        and stamp_path.read_text() == stamp
        and (out / "report.html").exists()
        and (out / "report.md").exists()
        and _figures_present(out)
    )
    # config.json and env.json are written with the results they describe: an interrupted re-run
    # of an edited config leaves the previous four files together
    R.atomic_write(out / "results.json", results_text)
    R.atomic_write(out / "runs.json", runs_text)
    R.atomic_write(out / "config.json", dumps(resolved_json))
    R.atomic_write(env_path, dumps(env))
    if fresh:
        files = {
            "markdown": out / "report.md",
            "html": out / "report.html",
            "figures": out / "figures",
        }
        summary = (out / ".summary.txt").read_text() if (out / ".summary.txt").exists() else ""
    else:
        files, summary = _render(out, resolved_json, runs, env)
        R.atomic_write(out / ".summary.txt", summary)
        R.atomic_write(stamp_path, stamp)
    failed = _failures(runs)
    stale = _stale_runs(runs_dir, list(unique))
    if prune:
        import shutil

        for p in stale:
            shutil.rmtree(p)
    return Sweep(
        out=out,
        num_runs=len(unique),
        num_computed=len(todo),
        num_reused=len(unique) - len(todo),
        failed=failed,
        files={
            "results": out / "results.json",
            "runs": out / "runs.json",
            "env": env_path,
            **files,
        },
        summary=summary,
        rendered=not fresh,
        stale=tuple(stale),
        pruned=prune,
    )


def _malformed(config: Any, records: Any, rows: Any) -> str | None:
    """What is wrong with the shapes of ``config.json``, ``runs.json`` and ``results.json`` (valid JSON
    that :func:`run` never writes), or None."""
    if not isinstance(config, dict) or not all(
        isinstance(config.get(k), str) for k in ("kind", "name")
    ):
        return "config.json: expected an object with a 'kind' and a 'name'"
    if not isinstance(records, list) or not records:
        return "runs.json: expected a non-empty list of run records"
    for r in records:
        if not (
            isinstance(r, dict)
            and all(isinstance(r.get(k), str) for k in ("id", "status"))
            and isinstance(r.get("spec"), dict)
        ):
            return "runs.json: expected run records with an 'id', a 'status' and a 'spec'"
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "run_id" in r for r in rows):
        return "results.json: expected a list of rows with a 'run_id'"
    ids = {r["id"] for r in records}
    if not ids <= {r["run_id"] for r in rows}:
        return "results.json: some runs of runs.json have no row"
    return None


def rerender(out: str | Path) -> Sweep:
    """Re-render the report of folder ``out`` from its ``config.json``, ``env.json`` and the run
    results listed in ``results.json`` (nothing is recomputed): after a change to the report code,
    or to render a folder made elsewhere (``gradlab report DIR`` on the command line).

    >>> import pathlib, tempfile
    >>> from gradlab import lab
    >>> cfg = lab.parse({"kind": "gradcheck", "name": "doc", "gradcheck": {"problem": ["quadratic"]}})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     made = lab.run(cfg, out=pathlib.Path(d) / "doc")
    ...     (made.out / "report.md").unlink()
    ...     again = lab.rerender(made.out)
    ...     back = (made.out / "report.md").exists()
    >>> again.num_computed, again.num_runs == made.num_runs, back
    (0, True, True)

    Reference: :func:`run`; the report files are written atomically (:func:`gradlab.lab.report.atomic_write`).
    """
    out = Path(out)
    missing = [f for f in ("config.json", "results.json", "runs.json") if not (out / f).exists()]
    if missing:
        raise GradlabError(
            f"{out}: not a gradlab report folder (missing {', '.join(missing)}); "
            "run `gradlab run CONFIG --out DIR` first."
        )
    try:
        resolved_json = json.loads((out / "config.json").read_text())
        rows = json.loads((out / "results.json").read_text())
        records = json.loads((out / "runs.json").read_text())
        problem = _malformed(resolved_json, records, rows)
        if problem is None:
            runs = R.join(records, rows)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise GradlabError(
            f"{out}: cannot read the results ({problem}); re-run the config "
            "(`gradlab run CONFIG --out DIR` reuses the finished runs under runs/)."
        ) from None
    env = _read_env(out / "env.json") or {}
    if not os.access(out, os.W_OK | os.X_OK):
        raise GradlabError(
            f"{out}: not writable, so the report cannot be re-rendered in place; copy the folder "
            "somewhere writable and run `gradlab report` on the copy."
        )
    try:
        files, summary = _render(out, resolved_json, runs, env)
        R.atomic_write(out / ".summary.txt", summary)
    except (
        OSError
    ) as e:  # e.g. a read-only figures/ folder; atomic writes leave the old files whole
        raise GradlabError(
            f"{out}: cannot write the report ({e.strerror or e}: {e.filename}); "
            "make the folder writable, or re-render a copy."
        ) from None
    failed = _failures(runs)
    return Sweep(
        out=out,
        num_runs=len(runs),
        num_computed=0,
        num_reused=len(runs),
        failed=failed,
        files={
            "results": out / "results.json",
            "runs": out / "runs.json",
            "env": out / "env.json",
            **files,
        },
        summary=summary,
        rendered=True,
    )
