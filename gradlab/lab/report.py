"""Reports: the tidy results table, Markdown, self-contained HTML and PNG figures from finished runs.

A kind's ``report`` returns a list of blocks — :class:`Heading`, :class:`Text`, :class:`Table`,
:class:`Figure` — and this module renders the same blocks twice: to ``report.md`` (figures linked from
``figures/``) and to ``report.html`` (inline CSS, figures embedded as base64 PNG, every text escaped, no
external URL: it renders offline). Figure names are made unique before anything is drawn, so two plots
never overwrite each other. Every file is written atomically (a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import json
import math
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "TIMING_FIELDS",
    "Figure",
    "Heading",
    "Series",
    "Table",
    "Text",
    "atomic_write",
    "join",
    "line_figure",
    "median_range",
    "parameters",
    "render",
    "run_rows",
    "scatter_figure",
    "tidy",
]

# Columns that measure time: they differ between two runs of the same config; everything else must not.
TIMING_FIELDS = frozenset(
    {"compile_time", "run_time", "first_run_time", "time_per_step", "time_s", "seconds"}
)


@dataclasses.dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass(frozen=True)
class Text:
    text: str


@dataclasses.dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class Series:
    """One labelled curve: the runs' (x, y) lists (repeats) and an optional theory (x, y)."""

    label: str
    runs: Sequence[tuple[Sequence[float], Sequence[float | None]]]
    theory: tuple[Sequence[float], Sequence[float]] | None = None
    color: str | None = None  # a matplotlib colour; default: C0, C1, ... by position in the figure


@dataclasses.dataclass(frozen=True)
class Figure:
    """A figure to draw: ``draw(ax)`` on a matplotlib axis; ``name`` becomes the (unique) file name."""

    name: str
    caption: str
    draw: Callable[[Any], None]


@functools.cache
def _umask() -> int:
    """The process's umask (read once: ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: a
    reader (or a process killed mid-write) never sees a partial file.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "sub" / "a.txt"
    >>> atomic_write(path, "hello")  # the folder is created
    >>> path.read_text(), [p.name for p in path.parent.iterdir()]  # no temporary file is left
    ('hello', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; a report is as readable as any other file
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def median_range(values: Sequence[Any], *, fmt: str = "{:.3g}") -> str:
    """``median [min–max]`` of the non-missing values (just the value if they agree; '—' if none).

    >>> median_range([3, 1, 2]), median_range([5, 5]), median_range([None])
    ('2 [1–3]', '5', '—')
    """
    vals = [
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    if not vals:
        return "—"
    med = fmt.format(statistics.median(vals))
    lo, hi = fmt.format(min(vals)), fmt.format(max(vals))
    missing = len(values) - len(vals)
    extra = f" ({missing} n/a)" if missing else ""
    return (f"{med} [{lo}–{hi}]" if lo != hi else med) + extra


def censored_median(values: Sequence[Any]) -> float | None:
    """The median of values where ``None`` means "not reached" (right-censored, larger than every
    reached value): ``inf`` when the middle of the sorted values is censored, ``None`` for no values.

    >>> censored_median([3, None, 1]), censored_median([3, None]), censored_median([])
    (3.0, inf, None)
    """
    if not values:
        return None
    return float(statistics.median(math.inf if v is None else float(v) for v in values))


def median_range_censored(
    values: Sequence[Any], bounds: Sequence[Any], *, fmt: str = "{:.3g}"
) -> str:
    """:func:`median_range` of a quantity some runs never reached (``None`` in ``values``), such as the
    steps to a tolerance: those count as larger than their run's ``bounds[i]`` (the steps it ran), so
    the median is ``>bound`` when more than half did not reach it, and the count is shown.

    >>> median_range_censored([20, None], [100, 100], fmt="{:.0f}")
    '>100 [20–>100] (1 of 2 not reached)'
    >>> median_range_censored([20, 30, None], [100, 100, 100], fmt="{:.0f}")
    '30 [20–>100] (1 of 3 not reached)'
    >>> median_range_censored([None, None], [100, 100], fmt="{:.0f}")
    'not reached (>100)'
    """
    missing = [b for v, b in zip(values, bounds, strict=True) if v is None]
    if not missing:
        return median_range(values, fmt=fmt)
    known = [float(b) for b in missing if b is not None]
    bound = ">" + fmt.format(max(known)) if known else "∞"
    reached = [float(v) for v in values if v is not None]
    if not reached:
        return f"not reached ({bound})" if known else "not reached"
    med = censored_median(values)
    shown = fmt.format(med) if med is not None and math.isfinite(med) else bound
    return f"{shown} [{fmt.format(min(reached))}–{bound}] ({len(missing)} of {len(values)} not reached)"


def slug(text: str) -> str:
    """A file-name-safe version of ``text``.

    >>> slug("two_point(num_directions=4), sgd(lr=theory)")
    'two_point-num_directions-4-sgd-lr-theory'
    """
    s = re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.")
    return s[:120] or "figure"


def line_figure(
    name: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Sequence[Series],
    logy: bool = False,
    logx: bool = False,
    markers: bool = False,
) -> Figure:
    """A line plot: for each series, its first repeat as a thick line and the other repeats as thin
    ones, plus its theory curve dashed in the same colour. Nothing is drawn until :func:`render`.

    >>> fig = line_figure("gap", title="t", xlabel="step", ylabel="gap", logy=True,
    ...                   series=[Series("exact", [([0, 1, 2], [1.0, 0.5, 0.25])], theory=([0, 2], [1, 0.3]))])
    >>> fig.name, fig.caption
    ('gap', 'gap vs step — t')
    """

    def draw(ax: Any) -> None:
        import numpy as np

        colors = [s.color or f"C{i % 10}" for i, s in enumerate(series)]
        for s, color in zip(series, colors, strict=True):
            for i, (x, y) in enumerate(s.runs):
                yy = np.array([np.nan if v is None else v for v in y], dtype=float)
                # a diverging run is drawn up to 1e100, beyond which axes stop being readable
                yy = np.where(np.isfinite(yy) & (np.abs(yy) < 1e100), yy, np.nan)
                if logy:
                    yy = np.where(yy > 0, yy, np.nan)
                ax.plot(
                    x,
                    yy,
                    color=color,
                    lw=1.4 if i == 0 else 0.6,
                    alpha=1.0 if i == 0 else 0.5,
                    label=s.label if i == 0 else None,
                    marker="o" if markers else None,
                    ms=3,
                )
            if s.theory is not None:
                tx, ty = s.theory
                ty = np.asarray(ty, dtype=float)
                if logy:
                    ty = np.where(ty > 0, ty, np.nan)
                ax.plot(tx, ty, color=color, lw=1.0, ls="--")
        if any(s.theory is not None for s in series):
            ax.plot([], [], color="0.3", lw=1.0, ls="--", label="theory (dashed, same colour)")
        # a log axis needs a positive value to show (an exact estimate has error 0)
        positive = [
            v
            for s in series
            for _, y in s.runs
            for v in y
            if v is not None and np.isfinite(v) and v > 0
        ]
        if logy and positive:
            ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    caption = f"{ylabel} vs {xlabel} — {title}"
    return Figure(name=name, caption=caption, draw=draw)


def scatter_figure(
    name: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    points: Sequence[tuple[str, float, float, float | None, float | None]],
) -> Figure:
    """Labelled points ``(label, x, y, x_pred, y_pred)``: measured (filled) and, where given, predicted
    (hollow, joined to the measurement by a thin line). Nothing is drawn until :func:`render`.

    >>> fig = scatter_figure("pareto", title="memory vs FLOPs", xlabel="memory", ylabel="FLOPs",
    ...                      points=[("sqrt", 0.3, 1.3, 0.28, 1.33), ("none", 1.0, 1.0, None, None)])
    >>> fig.name
    'pareto'
    """

    def draw(ax: Any) -> None:
        for i, (label, x, y, xp, yp) in enumerate(points):
            color = f"C{i % 10}"
            ax.plot([x], [y], "o", color=color, label=label)
            if xp is not None and yp is not None:
                ax.plot([xp], [yp], "s", mfc="none", color=color)
                ax.plot([x, xp], [y, yp], "-", lw=0.6, color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)

    return Figure(name=name, caption=f"{ylabel} vs {xlabel} — {title}", draw=draw)


# --------------------------------------------------------------------------------------------------
# the tidy table


def _flat(prefix: str, d: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in d.items() if k != "name"}


_AXES = ("problem", "strategy", "optimizer")


def parameters(run: Mapping[str, Any]) -> dict[str, Any]:
    """The parameter columns of a run: id, status, axis names and ``axis.option`` columns, the spec's
    scalar settings (repeat, seed, dtype, and the kind's own: budgets, sizes, points ...), display
    labels. (Point metrics must not reuse these names.)

    >>> run = {"id": "r1", "status": "ok", "spec": {"kind": "descent", "seed": 0, "tol": 1e-6,
    ...        "strategy": {"name": "two_point", "num_directions": 4}}, "labels": {"strategy_label": "zo"}}
    >>> parameters(run)
    {'run_id': 'r1', 'kind': 'descent', 'status': 'ok', 'seed': 0, 'tol': 1e-06, 'strategy': 'two_point', 'strategy.num_directions': 4, 'strategy_label': 'zo'}
    """
    spec = run["spec"]
    base: dict[str, Any] = {"run_id": run["id"], "kind": spec["kind"], "status": run["status"]}
    for k, v in spec.items():
        if isinstance(v, Mapping) and "name" in v:
            base[k] = v["name"]
            base.update(_flat(k, v))
        elif k != "kind" and (v is None or isinstance(v, bool | int | float | str)):
            base[k] = v
    base.update(run.get("labels") or {})
    return base


def tidy(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The long table of ``results.json``: one row per run and recorded point — the run's
    :func:`parameters`, its timing, and the point's metrics. A run without points (a failed run)
    gives one row with its error.

    Run-level summaries (steps to tol, final gap, ...) are in ``runs.json``, one row per run.

    >>> run = {"id": "r1", "status": "ok", "spec": {"kind": "descent", "seed": 0},
    ...        "timing": {"run_time": 0.5}, "summary": {"steps_to_tol": 1},
    ...        "points": [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0}]}
    >>> tidy([run])
    [{'run_id': 'r1', 'status': 'ok', 'seed': 0, 'run_time': 0.5, 'step': 0, 'loss': 2.0}, {'run_id': 'r1', 'status': 'ok', 'seed': 0, 'run_time': 0.5, 'step': 1, 'loss': 1.0}]
    >>> join(run_rows([run]), tidy([run])) == [run]  # runs.json + results.json give the runs back
    True
    """
    rows = []
    for run in runs:
        # display labels and the kind are per run: they live in runs.json, not on every point
        base = {
            k: v for k, v in parameters(run).items() if k != "kind" and not k.endswith("_label")
        }
        base.update(run.get("timing") or {})
        points = run.get("points") or []
        if not points:
            rows.append({**base, "error": run.get("error")})
        for p in points:
            rows.append({**base, **p})
    return rows


def run_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``runs.json``: one record per run — id, spec, status, error, labels, summary, timing (no points).

    >>> run_rows([{"id": "r1", "status": "ok", "summary": {"steps_to_tol": 3}, "points": [{"step": 0}]}])
    [{'id': 'r1', 'status': 'ok', 'summary': {'steps_to_tol': 3}}]
    """
    return [{k: v for k, v in run.items() if k != "points"} for run in runs]


def join(run_records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rebuild full run records (with points) from ``runs.json`` and ``results.json``.

    The inverse of :func:`tidy` + :func:`run_rows`. A run without points has one row that carries its
    error message under ``error``; a point may have an ``error`` metric of its own (a gradient check's
    relative error), so ``error`` is kept in the points of every run that has points.

    >>> record = {"id": "r1", "status": "ok", "spec": {"kind": "gradcheck", "seed": 0}}
    >>> join([record], [{"run_id": "r1", "status": "ok", "seed": 0, "method": "central", "error": 1e-9}])
    [{'id': 'r1', 'status': 'ok', 'spec': {'kind': 'gradcheck', 'seed': 0}, 'points': [{'method': 'central', 'error': 1e-09}]}]
    """
    point_keys: dict[str, list[dict]] = {}
    for run in run_records:
        point_keys[run["id"]] = []
    base_keys = {k for run in run_records for k in (*parameters(run), *(run.get("timing") or {}))}
    for r in rows:
        if r["run_id"] in point_keys:
            p = {k: v for k, v in r.items() if k not in base_keys}
            if p and not (p.keys() == {"error"} and not isinstance(p["error"], int | float)):
                point_keys[r["run_id"]].append(p)
    return [{**run, "points": point_keys[run["id"]]} for run in run_records]


# --------------------------------------------------------------------------------------------------
# rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:block;margin:.8em 0;max-width:100%}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px;font-size:.85em}
pre{padding:.6em;overflow-x:auto}.fail{color:#a00}
"""


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _unique_names(blocks: Sequence[Any]) -> dict[int, str]:
    names: dict[int, str] = {}
    seen: set[str] = set()
    for i, b in enumerate(blocks):
        if isinstance(b, Figure):
            base = slug(b.name)
            name, n = base, 2
            while name in seen:
                name, n = f"{base}-{n}", n + 1
            seen.add(name)
            names[i] = name + ".png"
    return names


def _draw_png(fig_block: Figure, dpi: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 3.6), dpi=dpi)
    try:
        fig_block.draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        # no timestamp in the metadata: the same data gives the same bytes
        fig.savefig(
            buf, format="png", dpi=dpi, metadata={"Software": None}, pil_kwargs={"optimize": True}
        )
        return buf.getvalue()
    finally:
        plt.close(fig)


def _cpu_phrase(cpu: Any) -> str:
    """`` (AMD EPYC; avx2, avx512f)`` from env.json's ``cpu`` (absent in reports made before it)."""
    if not isinstance(cpu, Mapping) or not cpu.get("model"):
        return ""
    isa = [f for f in cpu.get("isa") or [] if f in ("avx2", "avx512f", "asimd", "sve")]
    return f" ({cpu['model']}" + (f"; {', '.join(isa)}" if isa else "") + ")"


def _env_lines(env: Mapping[str, Any]) -> list[str]:
    if not env:
        return ["environment not recorded (env.json missing or unreadable)"]
    dev = env.get("devices") or {}
    return [
        f"gradlab {env.get('gradlab')} · JAX {env.get('jax')} (jaxlib {env.get('jaxlib')}) · "
        f"Python {env.get('python')}",
        f"backend {env.get('backend')} · devices {dev.get('count')} × {', '.join(dev.get('kinds', []))} · "
        f"x64 {env.get('x64')} · matmul precision {env.get('matmul_precision')}",
        f"git {env.get('git_commit') or 'n/a'} · host {env.get('platform')} · cpus {env.get('cpu_count')}"
        + _cpu_phrase(env.get("cpu"))
        + (
            f" · load average {env['load_average'][0]:.1f} at start"
            if env.get("load_average")
            else ""
        ),
    ]


def render(
    out: str | Path,
    *,
    title: str,
    blocks: Sequence[Any],
    env: Mapping[str, Any],
    config: Mapping[str, Any],
    failures: Sequence[Mapping[str, Any]] = (),
    dpi: int = 72,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` under ``out``; return their paths.

    ``blocks`` (:class:`Heading`, :class:`Text`, :class:`Table`, :class:`Figure`) follow the title, the
    config's description and the environment lines of ``env``; the failed runs and the resolved config
    close the report. Every file is written atomically; figures of earlier renders that this one does
    not draw are removed.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> files = render(out, title="demo", env={}, config={"description": "a table"},
    ...                blocks=[Heading("results"), Table(["x", "y"], [[1, 2.5]])])
    >>> sorted(files)
    ['figures', 'html', 'markdown']
    >>> print((out / "report.md").read_text().split("## results")[1].split("##")[0].strip())
    | x | y |
    |---|---|
    | 1 | 2.5 |
    """
    out = Path(out)
    figdir = out / "figures"
    head: list[Any] = [
        Heading(title, level=1),
    ]
    if config.get("description"):
        head.append(Text(config["description"]))
    head.append(Text("\n".join(_env_lines(env))))
    blocks = [*head, *blocks]
    if failures:
        blocks.append(Heading("Failed runs"))
        blocks.append(
            Table(
                ["run", "status", "error"],
                [[f["id"], f["status"], f.get("error") or ""] for f in failures],
            )
        )
    blocks.append(Heading("Config (resolved, with defaults)"))
    blocks.append(Text("```json\n" + json.dumps(config, indent=2) + "\n```"))
    names = _unique_names(blocks)
    pngs: dict[int, bytes] = {i: _draw_png(blocks[i], dpi) for i in names}
    # remove figures of earlier renders that this one does not draw
    if figdir.exists():
        keep = set(names.values())
        for f in figdir.glob("*.png"):
            if f.name not in keep:
                f.unlink()
    for i, data in pngs.items():
        atomic_write(figdir / names[i], data)

    md: list[str] = []
    body: list[str] = []
    for i, b in enumerate(blocks):
        if isinstance(b, Heading):
            md.append(f"{'#' * b.level} {b.text}\n")
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Text):
            if b.text.startswith("```"):
                md.append(b.text + "\n")
                inner = b.text.split("\n", 1)[1].rsplit("```", 1)[0]
                body.append(f"<pre>{html.escape(inner)}</pre>")
            else:
                md.append(b.text.replace("\n", "  \n") + "\n")
                body.append(
                    "<p>" + "<br>".join(html.escape(t) for t in b.text.split("\n")) + "</p>"
                )
        elif isinstance(b, Table):
            md.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            md.append("|" + "|".join("---" for _ in b.header) + "|")
            md.extend("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.rows)
            md.append("")
            th = "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header)
            trs = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                for r in b.rows
            )
            body.append(f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>")
        elif isinstance(b, Figure):
            name = names[i]
            md.append(f"![{_md_cell(b.caption)}](figures/{name})\n")
            data = base64.b64encode(pngs[i]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(b.caption, quote=True)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(b.caption)}'
                "</figcaption></figure>"
            )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    atomic_write(out / "report.md", "\n".join(md))
    atomic_write(out / "report.html", page)
    return {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "figures": figdir,
    }
