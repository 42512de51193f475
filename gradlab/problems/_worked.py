"""Worked examples of the catalog: the small functions of the lecture notes, with their numbers.

``toy_graph`` and ``sigmoid_neuron`` start (``init``) at the notes' point and carry the numbers printed
there in ``data`` (``published_value``, ``published_grad``, ``published_decimals``), so a check can hold
gradlab's closed forms and JAX's AD against them. The notes print no numbers for
``forward_mode_example``: gradlab picks the point (2, 3) and stores the exact values. ``schwarz``
starts at a generic point and carries the published mixed partials at the origin. ``key`` is accepted,
as by every factory, and ignored.

``loss``, ``grad`` and ``hvp`` are jitted module-level functions wrapped in
:class:`jax.tree_util.Partial`: they compile once per dtype, and can be passed as arguments to a jitted
function.

The Schwarz counterexample is the catalog's warning: a function whose mixed second partials at the
origin differ, so no symmetric Hessian exists there — and ``jax.hessian`` still returns one.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from gradlab._validate import check_positive
from gradlab.problems import Problem, register
from gradlab.problems._common import resolve_dtype

__all__ = ["SchwarzMixedPartials", "schwarz_mixed_partials"]


def _scalar(value: float, dt: Any) -> jax.Array:
    return jnp.asarray(value, dtype=dt)


# --------------------------------------------------------------------------------------------------
# (x + y) z
# --------------------------------------------------------------------------------------------------


@jax.jit
def _toy_loss(p):
    return (p["x"] + p["y"]) * p["z"]


@jax.jit
def _toy_grad(p):
    return {"x": p["z"] * 1, "y": p["z"] * 1, "z": p["x"] + p["y"]}


@jax.jit
def _toy_hvp(p, v):
    del p
    return {"x": v["z"] * 1, "y": v["z"] * 1, "z": v["x"] + v["y"]}


@register("toy_graph")
def toy_graph(key: Any, /, *, dtype: Any = None) -> Problem:
    """The backprop toy graph f(x, y, z) = (x + y)z at (−2, 5, −4): f = −12, ∇f = (−4, −4, 3).

    Parameters: a dict of three scalars ``{"x", "y", "z"}`` (it exercises pytree parameters).

    Backprop on the graph ``q = x + y``, ``f = qz``: forward ``q = 3``, ``f = −12``; backward
    ``∂f/∂z = q = 3``, ``∂f/∂q = z = −4``, and the add gate hands ``∂f/∂q`` to both inputs,
    ``∂f/∂x = ∂f/∂y = −4``. In general ``∇f = (z, z, x + y)``.

    The Hessian is constant, ``[[0, 0, 1], [0, 0, 1], [1, 1, 0]]`` (eigenvalues ``±√2`` and 0), so the
    HVP is ``(v_z, v_z, v_x + v_y)`` and ``smoothness`` is ``√2``. The function is an indefinite
    quadratic: no minimiser, no strong convexity.

    ``data``: ``published_value`` −12, ``published_grad`` ``{"x": −4, "y": −4, "z": 3}``,
    ``published_q`` 3 (the intermediate), ``published_decimals`` 0 (the numbers are exact).

    Options:
      dtype: floating dtype (``None``: JAX's default float).

    Reference: J. Johnson, lecture notes on backpropagation (Lecture 6, 2022), §6.2 "toy example";
    the same graph in the CS231n notes "Backpropagation, intuitions".

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("toy_graph", jax.random.key(0))
    >>> float(p.loss(p.init))
    -12.0
    >>> {k: float(v) for k, v in p.grad(p.init).items()}
    {'x': -4.0, 'y': -4.0, 'z': 3.0}
    """
    del key
    dt = resolve_dtype(dtype)

    def random_point(k):
        x, y, z = jax.random.normal(k, (3,), dt)
        return {"x": x, "y": y, "z": z}

    return Problem(
        name="toy_graph",
        loss=Partial(_toy_loss),
        grad=Partial(_toy_grad),
        hvp=Partial(_toy_hvp),
        init={"x": _scalar(-2.0, dt), "y": _scalar(5.0, dt), "z": _scalar(-4.0, dt)},
        solution=None,
        min_value=None,
        smoothness=math.sqrt(2.0),
        strong_convexity=None,
        random_point=random_point,
        data={
            "published_value": -12.0,
            "published_grad": {"x": -4.0, "y": -4.0, "z": 3.0},
            "published_q": 3.0,
            "published_decimals": 0,
        },
        options={"dtype": dt.name},
        description="f(x, y, z) = (x + y)z, at (−2, 5, −4)",
        reference="Johnson, backprop lecture notes (2022), §6.2",
        analytic=True,
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# sigmoid neuron
# --------------------------------------------------------------------------------------------------


def _neuron_pre(p):
    w, x = p["w"], p["x"]
    return w[0] * x[0] + w[1] * x[1] + w[2]


@jax.jit
def _neuron_loss(p):
    return jax.nn.sigmoid(_neuron_pre(p))


@jax.jit
def _neuron_grad(p):
    s = jax.nn.sigmoid(_neuron_pre(p))
    ds = s * (1 - s)
    return {
        "w": ds * jnp.concatenate([p["x"], jnp.ones((1,), p["x"].dtype)]),
        "x": ds * p["w"][:2],
    }


@jax.jit
def _neuron_hvp(p, v):
    s = jax.nn.sigmoid(_neuron_pre(p))
    ds = s * (1 - s)
    dds = ds * (1 - 2 * s)
    u_w = jnp.concatenate([p["x"], jnp.ones((1,), p["x"].dtype)])
    u_x = p["w"][:2]
    uv = jnp.vdot(u_w, v["w"]) + jnp.vdot(u_x, v["x"])
    cross_w = jnp.concatenate([v["x"], jnp.zeros((1,), v["x"].dtype)])
    return {"w": dds * uv * u_w + ds * cross_w, "x": dds * uv * u_x + ds * v["w"][:2]}


@register("sigmoid_neuron")
def sigmoid_neuron(key: Any, /, *, dtype: Any = None) -> Problem:
    """The sigmoid neuron f(w, x) = σ(w₀x₀ + w₁x₁ + w₂) of the backprop notes, with their numbers.

    Parameters: ``{"w": (3,), "x": (2,)}``; both the weights and the inputs are variables, as in the
    notes' circuit. ``σ(t) = 1/(1 + e^{−t})``.

    Gradient: with ``z = w₀x₀ + w₁x₁ + w₂`` and ``σ' = σ(1 − σ)`` (the sigmoid node's local
    gradient), ``∂f/∂w = σ'(z)·(x₀, x₁, 1)`` and ``∂f/∂x = σ'(z)·(w₀, w₁)``.

    At the notes' point ``w = (2, −3, −3)``, ``x = (−1, −2)``: ``z = 1``, ``f = σ(1) ≈ 0.73``,
    ``σ'(1) ≈ 0.20``, ``∂f/∂w ≈ (−0.20, −0.39, 0.20)``, ``∂f/∂x ≈ (0.39, −0.59)`` (two decimals, as
    published; ``data["published_*"]``).

    HVP: with ``u = ∇z = ((x₀, x₁, 1), (w₀, w₁))`` and ``σ'' = σ'(1 − 2σ)``,
    ``∇²f = σ''(z) uuᵀ + σ'(z) ∇²z``, where ``∇²z`` only pairs ``w₀`` with ``x₀`` and ``w₁`` with
    ``x₁``; so ``Hv = σ''⟨u, v⟩u + σ'((v_x₀, v_x₁, 0), (v_w₀, v_w₁))``. The Hessian is unbounded
    (``u`` grows with the parameters), so ``smoothness`` is ``None``; the function is not convex.

    Options:
      dtype: floating dtype (``None``: JAX's default float).

    Reference: J. Johnson, lecture notes on backpropagation (Lecture 6, 2022), the sigmoid node and
    the "flat" backprop code; the numbers as in the CS231n notes "Backpropagation, intuitions".

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("sigmoid_neuron", jax.random.key(0))
    >>> round(float(p.loss(p.init)), 2)
    0.73
    >>> g = p.grad(p.init)
    >>> [round(float(t), 2) for t in g["w"]], [round(float(t), 2) for t in g["x"]]
    ([-0.2, -0.39, 0.2], [0.39, -0.59])
    """
    del key
    dt = resolve_dtype(dtype)

    def random_point(k):
        z = jax.random.normal(k, (5,), dt)
        return {"w": z[:3], "x": z[3:]}

    return Problem(
        name="sigmoid_neuron",
        loss=Partial(_neuron_loss),
        grad=Partial(_neuron_grad),
        hvp=Partial(_neuron_hvp),
        init={"w": jnp.asarray([2.0, -3.0, -3.0], dt), "x": jnp.asarray([-1.0, -2.0], dt)},
        solution=None,
        min_value=None,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={
            "published_value": 0.73,
            "published_grad": {"w": (-0.20, -0.39, 0.20), "x": (0.39, -0.59)},
            "published_local_grad": 0.20,
            "published_decimals": 2,
        },
        options={"dtype": dt.name},
        description="f(w, x) = σ(w₀x₀ + w₁x₁ + w₂), at w = (2, −3, −3), x = (−1, −2)",
        reference="Johnson, backprop lecture notes (2022), sigmoid node; CS231n backprop notes",
        analytic=True,
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# forward / reverse mode example
# --------------------------------------------------------------------------------------------------


def _forward_mode_numbers(w1: float, w2: float) -> dict[str, Any]:
    """The intermediates, tangents and adjoints of the graph at ``(w1, w2)``, in float64."""
    v1 = math.log(w1)
    v2 = w2 * v1
    v3 = math.sqrt(v2)
    bar_v2 = 1.0 + 0.5 / v3
    return {
        "value": v2 + v3,
        "grad": (bar_v2 * w2 / w1, bar_v2 * v1),
        "primals": {"v1": v1, "v2": v2, "v3": v3},
        # forward mode, seeded with dw = e1 (one pass per input):
        "tangents_w1": {"v1": 1 / w1, "v2": w2 / w1, "v3": 0.5 / v3 * w2 / w1},
        "tangents_w2": {"v1": 0.0, "v2": v1, "v3": 0.5 / v3 * v1},
        # reverse mode, seeded with L̄ = 1 (one pass for both inputs):
        "adjoints": {"v3": 1.0, "v2": bar_v2, "v1": bar_v2 * w2},
    }


@jax.jit
def _fme_loss(w):
    v2 = w[1] * jnp.log(w[0])
    return v2 + jnp.sqrt(v2)


@jax.jit
def _fme_grad(w):
    v1 = jnp.log(w[0])
    bar_v2 = 1 + 0.5 / jnp.sqrt(w[1] * v1)
    return jnp.stack([bar_v2 * w[1] / w[0], bar_v2 * v1])


@jax.jit
def _fme_hvp(w, v):
    v1 = jnp.log(w[0])
    v2 = w[1] * v1
    d1 = 1 + 0.5 / jnp.sqrt(v2)
    d2 = -0.25 / (v2 * jnp.sqrt(v2))
    g = jnp.stack([w[1] / w[0], v1])
    hv2 = jnp.stack([-w[1] / w[0] ** 2 * v[0] + v[1] / w[0], v[0] / w[0]])
    return d2 * jnp.vdot(g, v) * g + d1 * hv2


@register("forward_mode_example")
def forward_mode_example(key: Any, /, *, dtype: Any = None) -> Problem:
    """The AD-modes example L(w₁, w₂) = w₂ log w₁ + √(w₂ log w₁), at the point (2, 3).

    Parameters: ``w = (w₁, w₂)``, an array of shape ``(2,)`` (forward mode seeds ``e₁`` then
    ``e₂``; reverse mode gets both partials from one pass).

    The graph: ``v₁ = log w₁``, ``v₂ = w₂v₁``, ``v₃ = √v₂``, ``L = v₂ + v₃``. Reverse mode:
    ``L̄ = 1``, ``v̄₃ = 1``, ``v̄₂ = 1 + 1/(2√v₂)``, ``v̄₁ = v̄₂ w₂``, hence::

        ∂L/∂w₁ = (1 + 1/(2√v₂)) w₂/w₁,    ∂L/∂w₂ = (1 + 1/(2√v₂)) log w₁.

    The notes derive the graph and both modes symbolically but print no numbers; gradlab picks
    ``(w₁, w₂) = (2, 3)``: ``v₁ = log 2 ≈ 0.693147``, ``v₂ ≈ 2.079442``, ``v₃ ≈ 1.442027``,
    ``L ≈ 3.521468``, ``∇L ≈ (2.020101, 0.933485)``. ``data`` holds these (exact float64 values),
    with the forward-mode tangents of ``v₁, v₂, v₃`` for each seed and the reverse-mode adjoints.

    HVP: ``L = φ(v₂)`` with ``φ(t) = t + √t``, ``φ' = 1 + 1/(2√t)``, ``φ'' = −1/(4t^{3/2})``;
    ``∇v₂ = (w₂/w₁, log w₁)`` and ``∇²v₂ = [[−w₂/w₁², 1/w₁], [1/w₁, 0]]``, so
    ``Hv = φ''⟨∇v₂, v⟩∇v₂ + φ'∇²v₂ v``.

    Domain: ``w₂ log w₁ > 0``; ``random_point`` draws ``w₁ ∈ [1.5, 5]``, ``w₂ ∈ [0.5, 5]``. The
    curvature blows up as ``w₂ log w₁ → 0``: no ``smoothness``, no minimiser.

    Options:
      dtype: floating dtype (``None``: JAX's default float).

    Reference: D. Merkulov, "Matrix differentiation. Automatic differentiation. Checkpointing"
    (lecture notes), forward and reverse mode examples; Griewank & Walther (2008), *Evaluating
    Derivatives*, ch. 3.

    >>> import jax
    >>> from gradlab import problems
    >>> p = problems.make("forward_mode_example", jax.random.key(0))
    >>> round(float(p.loss(p.init)), 6)
    3.521468
    >>> [round(float(t), 6) for t in p.grad(p.init)]
    [2.020101, 0.933485]
    """
    del key
    dt = resolve_dtype(dtype)

    def random_point(k):
        u = jax.random.uniform(k, (2,), dt)
        return jnp.stack([1.5 + 3.5 * u[0], 0.5 + 4.5 * u[1]])

    numbers = _forward_mode_numbers(2.0, 3.0)
    return Problem(
        name="forward_mode_example",
        loss=Partial(_fme_loss),
        grad=Partial(_fme_grad),
        hvp=Partial(_fme_hvp),
        init=jnp.asarray([2.0, 3.0], dt),
        solution=None,
        min_value=None,
        smoothness=None,
        strong_convexity=None,
        random_point=random_point,
        data={"point": (2.0, 3.0), "point_chosen_by": "gradlab (the notes print no numbers)"}
        | numbers,
        options={"dtype": dt.name},
        description="L(w₁, w₂) = w₂ log w₁ + √(w₂ log w₁), at (2, 3)",
        reference="Merkulov, lecture notes on matrix and automatic differentiation (AD modes)",
        analytic=True,
        smooth=True,
    )


# --------------------------------------------------------------------------------------------------
# Schwarz / Peano counterexample
# --------------------------------------------------------------------------------------------------


def _schwarz_scaled(p: jax.Array):
    """x, y, whether (x, y) ≠ 0, and the scale-free a = x²/r², b = y²/r² (r² = x² + y²).

    a and b are computed from u, v = x/s, y/s with s = max(|x|, |y|), so that no x² + y² underflows into
    0/0 near the origin. They are homogeneous of degree 0, so s is held constant for the derivatives
    (stop_gradient) and every derivative stays exact. The double-where trick: the formula never sees
    s = 0, so its derivative stays finite; the callers' outer where gives the value at the origin.
    """
    x, y = p[0], p[1]
    s = jax.lax.stop_gradient(jnp.maximum(jnp.abs(x), jnp.abs(y)))
    nonzero = s > 0
    s = jnp.where(nonzero, s, 1)
    u, v = x / s, y / s
    q = jnp.where(nonzero, u * u + v * v, 1)
    return x, y, nonzero, u * u / q, v * v / q


@jax.jit
def _schwarz_loss(p: jax.Array) -> jax.Array:
    # f = xy·(x² − y²)/(x² + y²) = xy·(a − b); f(0, 0) = 0.
    x, y, nonzero, a, b = _schwarz_scaled(p)
    return jnp.where(nonzero, x * y * (a - b), 0)


@jax.jit
def _schwarz_grad(p: jax.Array) -> jax.Array:
    # ∂f/∂x = y(x⁴ + 4x²y² − y⁴)/r⁴ and ∂f/∂y = x(x⁴ − 4x²y² − y⁴)/r⁴, with a = x²/r², b = y²/r²:
    # ∂f/∂x = y(a² + 4ab − b²), ∂f/∂y = x(a² − 4ab − b²).
    x, y, nonzero, a, b = _schwarz_scaled(p)
    grad = jnp.stack([y * (a * a + 4 * a * b - b * b), x * (a * a - 4 * a * b - b * b)])
    return jnp.where(nonzero, grad, 0)


class SchwarzMixedPartials(NamedTuple):
    """The two mixed second partials of the Schwarz function at the origin.

    Attributes:
      fxy: ``(f_x)_y(0, 0) = ∂/∂y (∂f/∂x)`` — differentiate in ``x`` first, then ``y`` (≈ −1).
      fyx: ``(f_y)_x(0, 0) = ∂/∂x (∂f/∂y)`` — differentiate in ``y`` first, then ``x`` (≈ +1).
    """

    fxy: float
    fyx: float


def schwarz_mixed_partials(*, h: float = 1e-3) -> SchwarzMixedPartials:
    """The mixed partials of the Schwarz function at 0, by differences of its closed-form gradient.

    ``f_x(0, y) = −y`` and ``f_y(x, 0) = x`` exactly, so the central differences
    ``(f_x(0, h) − f_x(0, −h))/(2h)`` and ``(f_y(h, 0) − f_y(−h, 0))/(2h)`` give −1 and +1 for every
    step ``h > 0``, up to rounding. Computed in JAX's default float.

    >>> m = schwarz_mixed_partials()
    >>> round(m.fxy, 12), round(m.fyx, 12)
    (-1.0, 1.0)

    Reference: Peano's counterexample (Genocchi & Peano, *Calcolo differenziale*, 1884), after
    Schwarz (1873); D. Merkulov, "Matrix differentiation. Automatic differentiation. Checkpointing"
    (the Schwarz theorem and this counterexample).
    """
    h = check_positive("h", h)
    dt = resolve_dtype(None)

    def g(x, y):
        return _schwarz_grad(jnp.asarray([x, y], dt))

    fxy = (g(0.0, h)[0] - g(0.0, -h)[0]) / (2 * h)
    fyx = (g(h, 0.0)[1] - g(-h, 0.0)[1]) / (2 * h)
    return SchwarzMixedPartials(fxy=float(fxy), fyx=float(fyx))


@register("schwarz")
def schwarz(key: Any, /, *, dtype: Any = None) -> Problem:
    """The Schwarz (Peano) counterexample f = xy(x² − y²)/(x² + y²): unequal mixed partials at 0.

    Parameters: ``p = (x, y)``, an array of shape ``(2,)``; ``f(0, 0) = 0``. In polar coordinates
    ``f = (r²/4) sin 4θ``: ``f`` is ``C¹`` everywhere and ``C^∞`` away from the origin, but not
    ``C²`` at the origin.

    Gradient (quotient rule, for ``r² = x² + y² > 0``)::

        ∂f/∂x = y(x⁴ + 4x²y² − y⁴)/r⁴,    ∂f/∂y = x(x⁴ − 4x²y² − y⁴)/r⁴,

    and ``∇f(0, 0) = (0, 0)`` (``f`` vanishes on both axes); the gradient is continuous.

    Mixed partials at the origin. Notation: ``f_xy = (f_x)_y = ∂/∂y(∂f/∂x)``, differentiate in ``x``
    first, then in ``y``; this is the order meant by "∂²f/∂x∂y(0, 0) = −1" here. (Texts that read
    ``∂²f/∂x∂y`` as ``∂/∂x(∂f/∂y)`` attach the same two numbers to the opposite labels; the statement
    without labels: x first then y gives −1, y first then x gives +1.) On the axes
    ``f_x(0, y) = −y`` and ``f_y(x, 0) = x``, so::

        f_xy(0, 0) = ∂/∂y f_x(0, y) = −1,    f_yx(0, 0) = ∂/∂x f_y(x, 0) = +1.

    The mixed partials exist but are not continuous at 0, so Schwarz's theorem does not apply and no
    symmetric matrix is the Hessian there (:func:`schwarz_mixed_partials` recovers −1 and +1 from
    the closed-form gradient). Away from the origin the Hessian is symmetric, of degree 0 in ``r``,
    and its off-diagonal entry has no limit at 0: on the x-axis it is ``+1`` and on the y-axis
    ``−1`` for every ``t ≠ 0``.

    What JAX says at the origin. The loss is written with the double-``where`` trick, so
    ``jax.grad`` is finite there: ``jax.grad(f)(0, 0) = (0, 0)``, correct. But AD differentiates the
    program, and at the origin the program is the constant branch: ``jax.hessian(f)(0, 0)`` returns
    ``[[0, 0], [0, 0]]`` (so do ``jacfwd(jacrev(f))`` and ``jacrev(jacfwd(f))``), a symmetric matrix
    that is wrong in both off-diagonal entries, silently. Near the origin ``jax.hessian`` returns
    ``[[0, 1], [1, 0]]`` at ``(t, 0)`` and ``[[0, −1], [−1, 0]]`` at ``(0, t)``, for every ``t ≠ 0``.
    (Without the where trick the formula gives NaN at the origin. The loss and gradient are computed
    from ``x/s, y/s`` with ``s = max(|x|, |y|)``, so tiny nonzero points do not underflow into
    ``0/0``.)

    Fields: ``init = (1, 0.5)``, a generic point, where ``f = 0.3`` and ``∇f = (0.62, −0.04)``;
    ``hvp`` is ``None`` (the second derivative at the origin is the point of the example);
    ``smoothness`` is ``7/2``: the Hessian eigenvalues on the circle at angle ``θ`` are
    ``(−3s ± 2√(1 + 3s²))/2`` with ``s = sin 4θ``, at most ``3.5`` in size (so ``∇f`` is Lipschitz
    although ``f`` is not ``C²``). Not convex, unbounded below. ``analytic`` is ``False`` (``where``).
    ``data`` holds ``published_mixed_partials`` ``{"fxy": −1, "fyx": +1}``, JAX's
    ``jax_hessian_at_origin``, and ``value_at_init`` / ``grad_at_init`` (exact; computed here).

    Options:
      dtype: floating dtype (``None``: JAX's default float).

    Reference: Peano's counterexample (Genocchi & Peano, *Calcolo differenziale*, 1884), after
    Schwarz (1873); D. Merkulov, "Matrix differentiation. Automatic differentiation. Checkpointing"
    (the Schwarz theorem and this counterexample).

    >>> import jax, jax.numpy as jnp
    >>> from gradlab import problems
    >>> p = problems.make("schwarz", jax.random.key(0))
    >>> round(float(p.loss(p.init)), 6), [round(float(t), 6) for t in p.grad(p.init)]
    (0.3, [0.62, -0.04])
    >>> jax.grad(p.loss)(jnp.zeros(2)).tolist()
    [0.0, 0.0]
    >>> jax.hessian(p.loss)(jnp.zeros(2)).tolist()  # symmetric, and wrong off the diagonal
    [[0.0, 0.0], [0.0, 0.0]]
    >>> m = schwarz_mixed_partials()
    >>> round(m.fxy, 9), round(m.fyx, 9)
    (-1.0, 1.0)
    """
    del key
    dt = resolve_dtype(dtype)

    def random_point(k):
        return jax.random.normal(k, (2,), dt)

    return Problem(
        name="schwarz",
        loss=Partial(_schwarz_loss),
        grad=Partial(_schwarz_grad),
        hvp=None,
        init=jnp.asarray([1.0, 0.5], dt),
        solution=None,
        min_value=None,
        smoothness=3.5,
        strong_convexity=None,
        random_point=random_point,
        data={
            "value_at_init": 0.3,
            "grad_at_init": (0.62, -0.04),
            "published_mixed_partials": {"fxy": -1.0, "fyx": 1.0},
            "jax_hessian_at_origin": ((0.0, 0.0), (0.0, 0.0)),
        },
        options={"dtype": dt.name},
        description="f(x, y) = xy(x² − y²)/(x² + y²), f(0, 0) = 0",
        reference="Peano (1884) after Schwarz (1873); Merkulov, matrix-calculus lecture notes",
        analytic=False,
        smooth=True,
    )
