"""Tests of gradlab.admodes: the mode-choosing Jacobian, cost counts, the crossover, the cheap gradient.

No timed assertions: timing goals live in benchmarks/jacobian_modes.py. Here: values against jax.jacfwd /
the matrix A, structure, the auto rule's choice, FLOP counts (deterministic) and error messages.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import admodes
from gradlab._validate import NotScalarError, OptionError, UnknownNameError


def _allclose_tree(a, b, rtol=1e-12, atol=1e-12):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _problems(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    wide = jax.random.normal(k1, (7, 3))  # n = 3 < m = 7
    tall = jax.random.normal(k2, (2, 6))  # n = 6 > m = 2
    p = {"w": jax.random.normal(k3, (3, 2)), "b": jax.random.normal(k4, (3,))}
    return {
        "n<m": (lambda x: jnp.tanh(wide @ x), jnp.linspace(-1.0, 1.0, 3)),
        "n>m": (lambda x: jnp.sin(tall @ x) * x[:2], jnp.linspace(-1.0, 1.0, 6)),
        "scalar": (lambda x: jnp.sum(jnp.exp(0.1 * x) ** 2), jnp.linspace(0.0, 1.0, 5)),
        "dict->tuple": (
            lambda q: (jnp.tanh(q["w"] @ q["b"][:2]), jnp.sum(q["b"] ** 2)),
            p,
        ),
    }


@pytest.mark.parametrize("name", ["n<m", "n>m", "scalar", "dict->tuple"])
@pytest.mark.parametrize("mode", admodes.MODES)
def test_jacobian_matches_jacfwd_with_the_same_structure(name, mode, key):
    f, x = _problems(key)[name]
    _allclose_tree(admodes.jacobian(f, x, mode=mode), jax.jacfwd(f)(x))


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (1, 6)])
def test_jacobian_of_a_linear_map_is_its_matrix(shape, key):
    A = jax.random.normal(key, shape)
    x = jnp.ones(shape[1])
    for mode in admodes.MODES:
        np.testing.assert_array_equal(
            np.asarray(admodes.jacobian(lambda x: A @ x, x, mode=mode)), A
        )


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [
        (3, 7, "forward"),
        (5, 5, "forward"),
        (6, 2, "reverse"),
        (10, 1, "reverse"),
        (1, 100, "forward"),
    ],
)
def test_auto_rule_forward_iff_inputs_at_most_outputs(n, m, expected):
    A = jnp.ones((m, n))
    f = lambda x: A @ x  # noqa: E731
    assert admodes.sizes(f, jnp.ones(n)) == (n, m)
    assert admodes.choose_mode(f, jnp.ones(n)) == expected


def test_sizes_and_choice_count_pytree_elements():
    x = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}  # n = 10
    f = lambda p: {"u": p["a"].ravel(), "v": jnp.concatenate([p["b"], p["b"]])}  # noqa: E731  m = 14
    assert admodes.sizes(f, x) == (10, 14)
    assert admodes.choose_mode(f, x) == "forward"
    assert admodes.choose_mode(lambda p: p["a"].sum(axis=0), x) == "reverse"


@pytest.mark.parametrize(("m", "n"), [(12, 4), (4, 12), (6, 6)])
def test_auto_compiles_to_the_chosen_mode(m, n):
    """The auto Jacobian is the chosen fixed mode's program: same FLOPs (and the cheaper of the two)."""
    A, x = jnp.ones((m, n)), jnp.ones(n)
    c = admodes.costs(lambda x, A: A @ x, x, A, ops=("jacfwd", "jacrev", "jacobian"), timed=False)
    chosen = "jacfwd" if admodes.choose_mode(lambda x: A @ x, x) == "forward" else "jacrev"
    assert c["jacobian"].flops == c[chosen].flops
    assert c["jacobian"].flops == min(c["jacfwd"].flops, c["jacrev"].flops)


def test_jacobian_is_jit_and_vmap_compatible_and_compiles_once(key):
    traces = []

    def jac(A, x):
        traces.append(None)
        return admodes.jacobian(lambda x: jnp.tanh(A @ x), x)

    fast = jax.jit(jac)
    A1, A2 = jax.random.normal(key, (2, 5, 3))
    x = jnp.arange(3.0)
    _allclose_tree(fast(A1, x), jax.jacfwd(lambda x: jnp.tanh(A1 @ x))(x))
    _allclose_tree(fast(A2, x + 1.0), jax.jacfwd(lambda x: jnp.tanh(A2 @ x))(x + 1.0))
    assert len(traces) == 1
    batched = jax.vmap(lambda x: admodes.jacobian(lambda x: jnp.tanh(A1 @ x), x))(jnp.ones((4, 3)))
    assert batched.shape == (4, 5, 3)


def test_costs_count_the_flops_of_each_operation():
    m, n = 30, 10
    A, x = jnp.ones((m, n)), jnp.ones(n)
    c = admodes.costs(lambda x, A: A @ x, x, A, timed=False)
    assert list(c) == [
        "forward",
        "jvp",
        "vjp",
        "jacfwd",
        "jacrev",
        "jacobian",
    ]  # no grad: not scalar
    assert c["forward"].dot_flops == 2 * m * n
    assert c["jacfwd"].dot_flops == 2 * m * n * n  # A · I_n
    assert c["jacrev"].dot_flops == 2 * m * m * n  # I_m · A
    assert c["forward"].flops_ratio == 1.0
    # jvp = f(x) and A v; vjp = f(x) and Aᵀu: two matvecs each.
    assert c["jvp"].dot_flops == c["vjp"].dot_flops == 4 * m * n
    for cost in c.values():
        assert cost.compile_s > 0 and cost.run_s is None and cost.time_ratio is None
        assert cost.memory_bytes >= 0


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_costs_timed_fields_without_timing_assertions(clock):
    if clock == "cpu" and jax.default_backend() != "cpu":
        pytest.skip(
            "clock='cpu' is refused off the CPU backend (test_cpu_clock_is_refused_off_the_cpu_backend)"
        )
    c = admodes.costs(
        lambda x: jnp.sum(jnp.sin(x) ** 2),
        jnp.ones(8),
        ops=("grad",),
        repeats=2,
        min_sample_s=1e-4,
        clock=clock,
    )
    assert list(c) == ["forward", "grad"]
    for cost in c.values():
        assert 0 < cost.min_s <= cost.run_s and cost.compile_s > 0
    assert c["forward"].time_ratio == 1.0
    assert math.isfinite(c["grad"].time_ratio) and c["grad"].time_ratio > 0


def test_costs_pytree_input_with_grad():
    loss = lambda p, y: jnp.sum((p["w"] * p["s"] - y) ** 2)  # noqa: E731
    p = {"w": jnp.arange(4.0), "s": jnp.float64(2.0)}
    c = admodes.costs(loss, p, jnp.ones(4), ops=("forward", "grad", "jacrev"), timed=False)
    assert list(c) == ["forward", "grad", "jacrev"]
    assert c["grad"].flops_ratio > 1


def test_costs_errors_name_the_argument():
    with pytest.raises(NotScalarError, match="ops: 'grad' needs f to return a scalar"):
        admodes.costs(lambda x: 2 * x, jnp.ones(3), ops=("grad",))
    with pytest.raises(
        UnknownNameError, match=r"ops: unknown name 'jacref'.*Did you mean 'jacrev'"
    ):
        admodes.costs(lambda x: 2 * x, jnp.ones(3), ops=("jacref",))
    with pytest.raises(OptionError, match="ops: expected a sequence"):
        admodes.costs(lambda x: 2 * x, jnp.ones(3), ops="jvp")
    with pytest.raises(OptionError, match="repeats: expected an integer ≥ 1"):
        admodes.costs(lambda x: 2 * x, jnp.ones(3), repeats=0)
    with pytest.raises(UnknownNameError, match="clock: unknown name 'cpu_time'"):
        admodes.costs(lambda x: 2 * x, jnp.ones(3), clock="cpu_time")


def test_jacobian_errors_name_the_argument():
    with pytest.raises(UnknownNameError, match="mode: unknown name 'fwd'"):
        admodes.jacobian(jnp.sin, jnp.ones(2), mode="fwd")
    with pytest.raises(OptionError, match="x: differentiation needs real floating-point inputs"):
        admodes.jacobian(lambda x: 2.0 * x, jnp.arange(3))


def test_crossover_flops_cross_at_m_equals_n():
    n = 20
    ms = (5, 10, 20, 40, 80)
    c = admodes.crossover(n, ms, key=jax.random.key(0), timed=False)
    assert c.ms == ms and c.forward_s is None and c.m_star_time is None
    assert c.m_star_flops == pytest.approx(n, rel=1e-9)
    assert 0.5 * n <= c.m_star_flops <= 2 * n
    for m, fwd, rev, auto, mode in zip(
        ms, c.forward_flops, c.reverse_flops, c.auto_flops, c.auto_mode, strict=True
    ):
        slack = 2 * max(m, n) ** 2  # the identity's compare/select and the like
        assert 2 * m * n * n <= fwd <= 2 * m * n * n + slack  # A · I_n
        assert 2 * m * m * n <= rev <= 2 * m * m * n + slack  # I_m · A
        assert mode == ("forward" if n <= m else "reverse")
        assert auto == min(fwd, rev)


def test_crossover_timed_fields():
    c = admodes.crossover(6, (3, 12), key=jax.random.key(1), repeats=2, min_sample_s=1e-4)
    for field in ("forward_s", "reverse_s", "auto_s", "forward_min_s", "auto_slowdown"):
        values = getattr(c, field)
        assert len(values) == 2 and all(v > 0 for v in values)
    # a number on the measured grid, or nan when noise hides the crossing on a 2-point grid
    m = c.m_star_time
    assert isinstance(m, float) and (math.isnan(m) or min(c.ms) <= m <= max(c.ms)), m


def test_cpu_clock_is_refused_off_the_cpu_backend(monkeypatch):
    """The process CPU time does not see a GPU's or TPU's time: clock='cpu' is an error there."""
    monkeypatch.setattr(admodes.jax, "default_backend", lambda: "gpu")
    with pytest.raises(OptionError, match=r"clock: 'cpu' reads the host's process CPU time.*gpu"):
        admodes.crossover(4, (2, 8), key=jax.random.key(0), clock="cpu")
    with pytest.raises(OptionError, match="use clock='wall'"):
        admodes.costs(lambda x: x * 2, jnp.ones(3), clock="cpu")


def test_crossover_errors_name_the_argument():
    key = jax.random.key(0)
    with pytest.raises(OptionError, match="n: expected an integer ≥ 1"):
        admodes.crossover(0, (1, 2), key=key)
    with pytest.raises(OptionError, match="key: expected a single"):
        admodes.crossover(4, (2, 4), key=0)
    with pytest.raises(OptionError, match="ms: expected a sequence of at least 2"):
        admodes.crossover(4, (8,), key=key)
    with pytest.raises(OptionError, match="ms: expected increasing distinct sizes"):
        admodes.crossover(4, (8, 2), key=key)
    with pytest.raises(UnknownNameError, match="dtype: unknown name 'float16'"):
        admodes.crossover(4, (2, 8), key=key, dtype="float16")


@pytest.mark.parametrize(
    ("forward", "reverse", "expected"),
    [
        ([1, 1, 1], [0.5, 1, 2], 20.0),  # exact tie at a grid point
        ([1, 1, 1], [0.1, 0.2, 0.5], math.nan),  # no crossing
        ([1, 1, 1], [2, 3, 4], math.nan),  # reverse always slower: none on the grid
    ],
)
def test_crossing(forward, reverse, expected):
    got = admodes.crossing([10, 20, 40], forward, reverse)
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_crossing_interpolates_in_log_log_and_takes_the_median_of_noisy_crossings():
    # ratio r(m) = m / 100 on a log grid: the interpolation is exact.
    assert admodes.crossing([10, 1000], [1.0, 1.0], [0.1, 10.0]) == pytest.approx(100.0)
    # noise: up between 10 and 20, down, up again between 40 and 80 → two upward crossings, their median.
    got = admodes.crossing([10, 20, 40, 80], [1, 1, 1, 1], [0.5, 2.0, 0.5, 2.0])
    assert got == pytest.approx((math.sqrt(10 * 20) + math.sqrt(40 * 80)) / 2)


def test_cheap_gradient_ratio_of_an_mlp_is_a_small_constant():
    loss, params, data = admodes.mlp(jax.random.key(0), widths=(16, 32, 32, 4), batch=16)
    r = admodes.cheap_gradient_ratio(loss, params, *data, timed=False)
    assert 2.0 <= r.flops_ratio <= 5.0
    assert r.grad_flops == pytest.approx(r.flops_ratio * r.forward_flops)
    assert r.time_ratio is None and r.forward_s is None
    g = jax.grad(loss)(params, *data)
    assert jax.tree.structure(g) == jax.tree.structure(params)


def test_mlp_shapes_and_errors():
    loss, params, (inputs, targets) = admodes.mlp(jax.random.key(2), widths=(3, 5, 2), batch=4)
    assert [w.shape for w in params["w"]] == [(3, 5), (5, 2)]
    assert [b.shape for b in params["b"]] == [(5,), (2,)]
    assert inputs.shape == (4, 3) and targets.shape == (4, 2) and inputs.dtype == jnp.float32
    assert loss(params, inputs, targets).shape == ()
    with pytest.raises(OptionError, match="widths: expected at least 2"):
        admodes.mlp(jax.random.key(0), widths=(3,))
    with pytest.raises(OptionError, match="batch: expected an integer ≥ 1"):
        admodes.mlp(jax.random.key(0), batch=0)


def test_cheap_gradient_ratio_of_a_convolution_stack():
    # convolutions are counted (they were 0 FLOPs, which made the ratio ~16)
    from jax import lax

    from gradlab import remat

    def layer(p, x):
        return jnp.tanh(
            lax.conv_general_dilated(x, p, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        )

    r = admodes.cheap_gradient_ratio(
        lambda P, x: jnp.sum(remat.scan_layers(layer, P, x)),
        0.1 * jnp.ones((4, 3, 8, 8)),
        jnp.ones((2, 16, 8)),
        timed=False,
    )
    assert 2.0 < r.flops_ratio < 4.0 and r.uncounted == ()
