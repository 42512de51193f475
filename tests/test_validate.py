"""The shared validation helpers: every message names the argument, the expectation and the fix."""

from typing import NamedTuple

import jax.numpy as jnp
import pytest

from gradlab._validate import (
    GradlabError,
    NotScalarError,
    OptionError,
    ShapeError,
    UnknownNameError,
    check_choice,
    check_options,
    check_positive,
    check_positive_int,
    check_same_structure,
    check_scalar_output,
)


def test_error_types_are_value_errors():
    for err in (UnknownNameError, OptionError, ShapeError, NotScalarError):
        assert issubclass(err, GradlabError)
        assert issubclass(err, ValueError)


def test_check_choice_suggests_a_close_name():
    assert check_choice("method", "central", ["central", "forward"]) == "central"
    with pytest.raises(UnknownNameError) as info:
        check_choice("method", "centarl", ["central", "forward"])
    msg = str(info.value)
    assert msg.startswith("method: unknown name 'centarl'")
    assert "['central', 'forward']" in msg and "Did you mean 'central'?" in msg


def test_check_options_lists_defaults():
    check_options("problem 'x'", {"dim": 3}, {"dim": 10})
    with pytest.raises(OptionError, match=r"problem 'x': unknown option 'size'.*dim=10"):
        check_options("problem 'x'", {"size": 3}, {"dim": 10})


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "3", None])
def test_check_positive_int_rejects(bad):
    with pytest.raises(OptionError, match=r"dim: expected an integer ≥ 1, got"):
        check_positive_int("dim", bad)


def test_check_positive():
    assert check_positive("step", 0.5) == 0.5
    for bad in (0.0, -1.0, float("inf"), float("nan"), "a"):
        with pytest.raises(OptionError, match="step: expected a positive"):
            check_positive("step", bad)


def test_check_scalar_output():
    check_scalar_output("f", jnp.zeros(()))
    check_scalar_output("f", 1.0)
    with pytest.raises(NotScalarError, match=r"f: .*got shape \(3,\).*jnp.sum"):
        check_scalar_output("f", jnp.zeros(3))
    with pytest.raises(NotScalarError, match="complex"):
        check_scalar_output("f", jnp.zeros((), jnp.complex128))
    with pytest.raises(NotScalarError, match="got list"):
        check_scalar_output("f", [1.0])


class Params(NamedTuple):
    w: jnp.ndarray


def test_check_same_structure():
    like = {"a": jnp.zeros(2), "b": jnp.zeros((2, 3))}
    check_same_structure("reference", {"a": jnp.ones(2), "b": jnp.ones((2, 3))}, like)
    with pytest.raises(ShapeError, match="reference: expected a pytree with the structure"):
        check_same_structure("reference", {"a": jnp.ones(2)}, like)
    with pytest.raises(
        ShapeError, match=r"reference: leaf \['b'\] has shape \(3, 2\), expected \(2, 3\)"
    ):
        check_same_structure("reference", {"a": jnp.ones(2), "b": jnp.ones((3, 2))}, like)
    with pytest.raises(ShapeError, match=r"grad: the array has shape \(3,\), expected \(2,\)"):
        check_same_structure("grad", jnp.ones(3), jnp.zeros(2))
    with pytest.raises(ShapeError, match=r"grad: leaf \[1\]\.w has shape"):
        check_same_structure(
            "grad", (jnp.ones(2), Params(jnp.ones(3))), (jnp.ones(2), Params(jnp.ones(4)))
        )


def test_check_key_names_what_it_got():
    import jax

    from gradlab._validate import check_key

    check_key(jax.random.key(0), "f")
    check_key(jax.random.PRNGKey(0), "f")
    with pytest.raises(OptionError) as info:
        check_key(3, "f")
    assert str(info.value) == (
        "key: expected a single jax.random.key(seed) (or a raw uint32[2] PRNGKey), got int. "
        "Pass key=jax.random.key(seed)."
    )
    with pytest.raises(OptionError, match=r"got ArrayImpl with dtype float32 and shape \(2,\)"):
        check_key(jnp.zeros(2, jnp.float32), "f")
    with pytest.raises(OptionError, match="key: f needs an explicit PRNG key"):
        check_key(None, "f")
