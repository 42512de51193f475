"""The ``gradlab`` command line.

Verbs:

- ``gradlab check``: the catalog table — every problem's hand-derived gradient against reverse mode,
  forward mode, finite differences and (where valid) the complex step, plus the HVP against the dense
  Hessian. Exit status 0 when every row is ok, 1 otherwise.
- ``gradlab check MODULE:FUNCTION --at POINT``: the same check for a user's own function at a point given
  as JSON (a number, a list, or an object of lists for a dict pytree); ``--reference MODULE:FUNCTION``
  adds the user's closed-form gradient.
- ``gradlab list [kinds|problems|strategies|optimizers]``: what a config can name, with options and
  defaults.
- ``gradlab validate CONFIG``: check a TOML experiment config (exit 2 with field-named errors).
- ``gradlab run CONFIG [--out DIR] [--jobs N] [--force] [--launcher L]``: run its sweep into a report
  folder (resumable; exit 1 if a run failed).
- ``gradlab report DIR``: re-render a report folder from its results.
- ``gradlab pitfalls``: the classic matrix-calculus pitfalls, with the numbers JAX gives.

Bad input (an unknown problem, a malformed point, a module that does not import) exits with status 2 and a
one-paragraph message, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from gradlab._interrupts import redeliver_interrupts
from gradlab._validate import GradlabError

__all__ = ["main"]


class UsageError(GradlabError):
    """A command-line argument that cannot be used as given."""


def _enable_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)


def _parse_point(text: str, dtype: str = "float64") -> Any:
    import jax.numpy as jnp
    import numpy as np

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(
            f"--at: expected JSON (a number, a list, or an object of lists), got {text!r} ({e.msg}). "
            "Example: --at '[1.0, 2.0]' or --at '{\"W\": [[1, 2], [3, 4]], \"b\": [0, 0]}'."
        ) from None

    def to_array(v: Any, where: str) -> Any:
        if isinstance(v, dict):
            return {k: to_array(x, f"{where}.{k}") for k, x in v.items()}
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            raise UsageError(
                f"--at{where}: expected numbers or nested lists of numbers, got {v!r}."
            ) from None
        with np.errstate(over="ignore"):
            cast = np.asarray(a, dtype=dtype)  # 1e39 overflows float32: checked after the cast
        if not np.all(np.isfinite(cast)):
            raise UsageError(f"--at{where}: expected finite numbers in {dtype}, got {v!r}.")
        return jnp.asarray(cast)

    return to_array(value, "")


def _load_callable(spec: str, argument: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"{argument}: expected MODULE:FUNCTION (e.g. mypkg.losses:loss), got {spec!r}."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may fail in any way
        raise UsageError(
            f"{argument}: could not import module {module_name!r}: {type(e).__name__}: {e}. "
            "Run from the folder that contains it, or install it."
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{argument}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{argument}: {spec!r} is not callable.")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _describe_point(x: Any) -> str:
    import jax

    shapes = jax.tree.map(lambda a: tuple(a.shape), x)
    return f"shape {shapes}" if not isinstance(shapes, dict) else f"shapes {shapes}"


def _trial_call(name: str, g: Any, x: Any) -> None:
    """Evaluate ``g`` abstractly at ``x`` (no FLOPs): an error names the function and the point's shape."""
    import jax

    try:
        jax.eval_shape(g, x)
    except Exception as e:  # the user's function may fail in any way
        raise UsageError(
            f"{name} raised {_first_line(e)} when called at the --at point "
            f"({_describe_point(x)}, {_point_dtype(x)}). Check that it is a pure JAX function of a point "
            "of this shape."
        ) from None


def _point_dtype(x: Any) -> str:
    import jax

    return ", ".join(sorted({str(a.dtype) for a in jax.tree.leaves(x)}))


def _cmd_check(args: argparse.Namespace) -> int:
    _enable_x64()
    import jax

    from gradlab import checks, problems

    user = [t for t in args.targets if ":" in t]
    names = [t for t in args.targets if ":" not in t]
    if user and names:
        raise UsageError(
            "check: give either catalog problem names or one MODULE:FUNCTION, not both."
        )
    if len(user) > 1:
        raise UsageError(f"check: give one MODULE:FUNCTION at a time, got {len(user)}.")
    if user:
        if args.at is None:
            raise UsageError(
                "--at: a point is required to check a user function, "
                "e.g. gradlab check mymodule:loss --at '[1.0, 2.0]'."
            )
        fn = _load_callable(user[0], "check")
        x = _parse_point(args.at, args.dtype)
        ref = _load_callable(args.reference, "--reference") if args.reference else None
        for name, g in ((user[0], fn), (args.reference, ref)):
            if g is not None:
                _trial_call(name, g, x)
        try:
            result = checks.gradient(fn, x, reference=ref, complex_step=args.complex_step)
        except GradlabError:
            raise
        except Exception as e:  # raised inside the user's function under jvp/grad/complex inputs
            raise UsageError(
                f"checking {user[0]} at the --at point failed: {_first_line(e)}. "
                "The function must be a pure JAX function of the point, returning a real scalar."
            ) from None
        print(result)
        return 0 if result.ok else 1
    if args.at is not None or args.reference is not None:
        raise UsageError("--at/--reference: only used with a MODULE:FUNCTION target.")
    for n in names:
        from gradlab._validate import check_choice

        check_choice("problem", n, problems.names())
    result = checks.catalog(names or None, key=jax.random.key(args.seed), dtype=args.dtype)
    print(result.table())
    if not result.ok:
        print("\nSome rows are not ok: see the errors above.", file=sys.stderr)
    return 0 if result.ok else 1


def _print_rows(title: str, rows: list[tuple[str, str, str]]) -> None:
    w0 = max(len(title), *(len(r[0]) for r in rows))
    w1 = max(len("options (defaults)"), *(len(r[1]) for r in rows))
    print(f"{title:<{w0}}  {'options (defaults)':<{w1}}  description")
    for name, opts, desc in rows:
        print(f"{name:<{w0}}  {opts:<{w1}}  {desc}".rstrip())


def _opts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items()) or "-"


def _cmd_list(args: argparse.Namespace) -> int:
    from gradlab import grads, problems
    from gradlab.lab import kinds
    from gradlab.lab.kinds import descent as descent_kind

    what = args.what
    blocks = []
    if what in ("all", "kinds"):
        rows = []
        for name in kinds.names():
            k = kinds.get(name)
            fields = {
                f: (v.default if v.default_factory is None else v.default_factory())
                for f, v in k.Section.model_fields.items()
            }
            shown = {f: v for f, v in fields.items() if not isinstance(v, list | dict)}
            rows.append((name, _opts(shown), k.SUMMARY))
        blocks.append(("kind", rows))
    if what in ("all", "problems"):
        rows = [
            (
                n,
                _opts({k: v for k, v in problems.options(n).items() if k != "dtype"}),
                problems.describe(n),
            )
            for n in problems.names()
        ]
        blocks.append(("problem", rows))
    if what in ("all", "strategies"):
        rows = []
        for n in grads.names():
            doc = (getattr(grads, n).__doc__ or "").strip().splitlines()
            rows.append((n, _opts(grads.options(n)), doc[0].replace("``", "") if doc else ""))
        blocks.append(("strategy", rows))
    if what in ("all", "optimizers"):
        base = {"learning_rate": descent_kind.Optimizer().learning_rate[0]}
        rows = [
            ("sgd", _opts(base), "optax.sgd; learning_rate = 'theory' takes the theory step"),
            (
                "momentum",
                _opts({**base, "momentum": descent_kind.DEFAULT_MOMENTUM}),
                "optax.sgd with heavy-ball momentum",
            ),
            (
                "nesterov",
                _opts({**base, "momentum": descent_kind.DEFAULT_MOMENTUM}),
                "optax.sgd with Nesterov momentum",
            ),
            ("adam", _opts({"learning_rate": "(required)"}), "optax.adam"),
            ("lbfgs", "-", "optax.lbfgs with its zoom line search (evaluations counted)"),
        ]
        blocks.append(("optimizer", rows))
    for i, (title, rows) in enumerate(blocks):
        if i:
            print()
        _print_rows(title, rows)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    _enable_x64()
    from gradlab import lab

    cfg = lab.load(args.config)
    specs = cfg.specs()
    print(
        f"{args.config}: ok — kind {cfg.kind.NAME!r}, name {cfg.name!r}, {len(specs)} runs "
        f"({cfg.experiment.repeats} repeat(s), seed {cfg.experiment.seed}, {cfg.experiment.dtype})."
    )
    if args.show:
        import json as _json

        print(_json.dumps(cfg.to_json(), indent=2))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gradlab import lab

    # a bad config exits 2 here (or, for the deep checks, in lab.run), before anything is written;
    # the deep checks are skipped when every run is cached
    cfg = lab.load(args.config, deep=False)
    sweep = lab.run(
        cfg,
        out=args.out,
        jobs=args.jobs,
        force=args.force,
        launcher=args.launcher,
        progress=not args.quiet and sys.stderr.isatty(),
        argv=["gradlab", *sys.argv[1:]] if sys.argv and sys.argv[0] else None,
        prune=args.prune,
    )
    print(sweep.summary)
    print(
        f"\n{sweep.num_runs} runs: {sweep.num_computed} computed, {sweep.num_reused} reused"
        + (f", {len(sweep.failed)} FAILED" if sweep.failed else "")
        + f".\nreport: {sweep.files['html']} (and report.md, results.json, env.json, figures/)"
    )
    if sweep.stale:
        n = len(sweep.stale)
        where = sweep.out / "runs"
        print(
            f"pruned {n} run folder(s) of no point of this config from {where}."
            if sweep.pruned
            else f"note: {n} run folder(s) in {where} belong to no point of this config "
            "(earlier versions of it); --prune deletes them."
        )
    for f in sweep.failed:
        print(f"failed run {f['id']}: {f['error']}", file=sys.stderr)
    return 1 if sweep.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from gradlab import lab

    sweep = lab.rerender(args.dir)
    print(sweep.summary)
    print(f"\nreport: {sweep.files['html']} (re-rendered from {sweep.num_runs} runs)")
    return 0


def _cmd_pitfalls(args: argparse.Namespace) -> int:
    _enable_x64()
    from gradlab import pitfalls

    print(pitfalls.table())
    return 0


def _parser() -> argparse.ArgumentParser:
    from gradlab import __version__

    p = argparse.ArgumentParser(
        prog="gradlab",
        description="A JAX lab for matrix calculus and gradient strategies.",
    )
    p.add_argument("--version", action="version", version=f"gradlab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser(
        "check",
        help="check closed-form gradients (the catalog, or MODULE:FUNCTION at a point)",
        description="Check gradients: every catalog problem (default), some of them by name, "
        "or a user's function MODULE:FUNCTION at a point given with --at.",
    )
    c.add_argument("targets", nargs="*", metavar="NAME|MODULE:FUNCTION")
    c.add_argument(
        "--seed", type=int, default=0, help="seed of the catalog's random instances (default 0)"
    )
    c.add_argument(
        "--dtype",
        choices=["float64", "float32"],
        default="float64",
        help="precision of the catalog instances, or of the --at point (default float64)",
    )
    c.add_argument("--at", help="the point, as JSON (number, list, or object of lists)")
    c.add_argument("--reference", metavar="MODULE:FUNCTION", help="a closed-form gradient to check")
    c.add_argument(
        "--complex-step", action="store_true", help="also use the complex step (analytic f only)"
    )
    c.set_defaults(func=_cmd_check)

    ls = sub.add_parser(
        "list", help="list experiment kinds, problems, strategies and optimizers with their options"
    )
    ls.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "kinds", "problems", "strategies", "optimizers"],
    )
    ls.set_defaults(func=_cmd_list)

    v = sub.add_parser("validate", help="check a TOML experiment config without running it")
    v.add_argument("config", metavar="CONFIG")
    v.add_argument("--show", action="store_true", help="print the resolved config as JSON")
    v.set_defaults(func=_cmd_validate)

    r = sub.add_parser(
        "run",
        help="run an experiment config into a report folder",
        description="Run the sweep of CONFIG. Finished runs are reused (content-addressed by spec, "
        "gradlab source and JAX version); --force recomputes them.",
    )
    r.add_argument("config", metavar="CONFIG")
    r.add_argument("--out", metavar="DIR", help="report folder (default gradlab-runs/<name>)")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (joblib loky processes)")
    r.add_argument("--force", action="store_true", help="recompute finished runs")
    r.add_argument(
        "--launcher",
        choices=["local", "submitit", "submitit-local"],
        default="local",
        help="where runs execute: local processes (joblib), or SLURM via submitit",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--prune",
        action="store_true",
        help="delete run folders under DIR/runs that belong to no point of this config",
    )
    r.set_defaults(func=_cmd_run)

    rp = sub.add_parser("report", help="re-render a report folder from its results")
    rp.add_argument("dir", metavar="DIR")
    rp.set_defaults(func=_cmd_report)

    pf = sub.add_parser("pitfalls", help="show the classic pitfalls with the numbers JAX gives")
    pf.set_defaults(func=_cmd_pitfalls)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradlab`` command; return its exit status (2 for bad input, without a traceback;
    130 on Ctrl-C, after the runs already finished have been saved)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with redeliver_interrupts():  # a Ctrl-C in a gc callback is not lost (nor printed)
            return int(args.func(args))
    except GradlabError as e:
        print(f"gradlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
