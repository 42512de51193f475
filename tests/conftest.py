"""Strict test set-up (as in optimistix and equinox): float64 on, implicit rank promotion raises,
warnings are errors (``filterwarnings = ["error"]`` in pyproject.toml), seeds fixed."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

SEEDS = (1, 2, 3)


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request):
    return request.param


@pytest.fixture
def key(seed):
    return jax.random.key(seed)
