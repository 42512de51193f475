"""Samplers: shapes, dtypes, the key scheme, and second moments against theory (float64)."""

import math

import jax
import jax.numpy as jnp
import pytest

from gradlab import samplers
from gradlab._validate import OptionError, ShapeError, UnknownNameError

NAMES = samplers.names()
LIKE = {"W": jnp.zeros((2, 3)), "b": jnp.zeros(2)}  # a dict pytree, d = 8


def test_names():
    assert NAMES == ["coordinate", "gaussian", "orthogonal", "rademacher", "sphere"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shape_dtype_and_direction(name, dtype):
    key = jax.random.key(1)
    like = jax.tree.map(lambda x: x.astype(dtype), LIKE)
    sample = samplers.make(name, like, num=3)
    assert (sample.name, sample.num, sample.dim) == (name, 3, 8)
    V = jax.jit(sample)(key)
    assert V.shape == (3, 8)
    assert V.dtype == dtype
    # direction(key, i) is row i of the block (the scheme the lean mode relies on)
    rows = jax.jit(jax.vmap(sample.direction, in_axes=(None, 0)))(key, jnp.arange(3))
    assert jnp.allclose(rows, V, rtol=0, atol=10 * jnp.finfo(dtype).eps)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_and_empty_like(name):
    # half precision works for every sampler (orthogonal's QR runs in float32, then casts)
    V = samplers.make(name, jnp.zeros(8, jnp.bfloat16), num=3)(jax.random.key(0))
    assert V.dtype == jnp.bfloat16 and V.shape == (3, 8) and bool(jnp.all(jnp.isfinite(V)))
    with pytest.raises(ShapeError, match="like: expected parameters with at least one entry"):
        samplers.make(name, {"a": jnp.zeros(0)}, num=1)


def test_iid_direction_is_fold_in(key):
    """The documented scheme: direction i of an iid sampler is drawn from fold_in(key, i)."""
    V = samplers.gaussian(jnp.zeros(5), num=4)(key)
    assert jnp.array_equal(V[3], jax.random.normal(jax.random.fold_in(key, 3), (5,), jnp.float64))
    R = samplers.rademacher(jnp.zeros(5), num=4)(key)
    assert jnp.array_equal(
        R[2], jax.random.rademacher(jax.random.fold_in(key, 2), (5,), jnp.float64)
    )


def test_special_values():
    key = jax.random.key(2)
    d = 1000
    V = samplers.sphere(jnp.zeros(d), num=4)(key)
    assert jnp.allclose(jnp.linalg.norm(V, axis=1), 1.0, atol=1e-13)
    R = samplers.rademacher(jnp.zeros(d), num=4)(key)
    assert set(jnp.unique(R).tolist()) == {-1.0, 1.0}
    Q = jax.jit(samplers.orthogonal(jnp.zeros(d), num=10))(key)
    assert jnp.allclose(Q @ Q.T, jnp.eye(10), atol=1e-13)
    C = samplers.coordinate(jnp.zeros(d), num=50)(key)
    assert jnp.array_equal(jnp.sum(C, axis=1), jnp.ones(50))
    assert jnp.max(jnp.sum(C, axis=0)) == 1.0  # distinct coordinates


@pytest.mark.parametrize("name", NAMES)
def test_second_moment(name):
    """E[(1/k) Σ_i v_i v_iᵀ] = m I, entrywise within 5 Monte-Carlo standard errors."""
    d, k, n = 5, 3, 4000
    sample = samplers.make(name, jnp.zeros(d), num=k)
    keys = jax.random.split(jax.random.key(7), n)

    @jax.jit
    def outer(keys):
        V = jax.vmap(sample)(keys)  # (n, k, d)
        return jnp.einsum("nki,nkj->nij", V, V) / k

    M = outer(keys)
    mean, sd = M.mean(axis=0), M.std(axis=0)
    expect = sample.second_moment * jnp.eye(d)
    assert sample.second_moment == pytest.approx(
        1.0 if name in ("gaussian", "rademacher") else 1.0 / d
    )
    assert jnp.all(jnp.abs(mean - expect) <= 5 * sd / math.sqrt(n) + 1e-12)


@pytest.mark.parametrize("name", ["orthogonal", "sphere", "gaussian", "rademacher"])
def test_directions_have_mean_zero(name):
    """E[v] = 0 entrywise (the Haar measure for ``orthogonal``: a QR factor without the sign fix of
    R's diagonal is biased towards negative diagonal entries), within 5 Monte-Carlo standard errors."""
    d, k, n = 6, 3, 4000
    sample = samplers.make(name, jnp.zeros(d), num=k)
    V = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(11), n))  # (n, k, d)
    mean, sd = V.mean(axis=0), V.std(axis=0)
    assert jnp.all(jnp.abs(mean) <= 5 * sd / math.sqrt(n))


def test_errors():
    with pytest.raises(OptionError, match=r"num: expected an integer ≥ 1, got -3"):
        samplers.sphere(jnp.zeros(3), num=-3)
    with pytest.raises(UnknownNameError, match=r"name: unknown name 'spere'.*'sphere'"):
        samplers.make("spere", jnp.zeros(3), num=1)
    with pytest.raises(OptionError, match=r"num: the 'orthogonal' sampler draws at most d = 3"):
        samplers.orthogonal(jnp.zeros(3), num=4)
    with pytest.raises(OptionError, match=r"num: the 'coordinate' sampler draws at most d = 3"):
        samplers.coordinate(jnp.zeros(3), num=4)
    with pytest.raises(OptionError, match=r"like: expected floating-point parameters"):
        samplers.gaussian(jnp.zeros(3, jnp.int32), num=1)
