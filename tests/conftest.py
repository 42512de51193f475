"""Strict test set-up (as in optimistix and equinox): float64 on, implicit rank promotion raises,
full-precision float32 matrix products, warnings are errors (``filterwarnings = ["error"]`` in
pyproject.toml), seeds fixed."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# float32 results are held to float32 tolerances: on GPUs JAX's default multiplies float32 matrices in
# TF32 (relative error 3e-4 on an H100), so the tests ask for full float32 (no effect on CPUs)
jax.config.update("jax_default_matmul_precision", "highest")

SEEDS = (1, 2, 3)


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def seed(request):
    return request.param


@pytest.fixture
def key(seed):
    return jax.random.key(seed)


@pytest.fixture
def python_without_x64():
    """``run(code, timeout)``: run ``code`` in a fresh Python with x64 off (the JAX default, which this
    process cannot return to) and assert that it exits 0 and prints ``ok`` last."""
    import os
    import subprocess
    import sys

    def run(code: str, timeout: float = 120) -> None:
        env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]

    return run


@pytest.fixture
def xla_cpu():
    """Compile and run on the CPU device, also on a machine with an accelerator: for tests and
    examples that hold XLA:CPU's own numbers (buffer assignment, FLOP counts, chunk widths)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield
