"""A user's own loss and two hand-derived gradients, one right and one with the classic mistake.

gradlab check examples.losses:stress --at '[[0,0],[1,0],[0,2]]' --reference examples.losses:stress_grad
gradlab check examples.losses:stress --at '[[0,0],[1,0],[0,2]]' --reference examples.losses:stress_grad_wrong
"""

import jax.numpy as jnp

# Squared distances of three hidden points in the plane.
D = jnp.array([[0.0, 2.0, 5.0], [2.0, 0.0, 1.0], [5.0, 1.0, 0.0]])


def stress(W):
    """L(W) = Σ_ij (‖W_i − W_j‖² − D_ij)², W of shape (3, 2)."""
    diff = W[:, None, :] - W[None, :, :]
    r = jnp.sum(diff**2, axis=-1) - D
    return jnp.sum(r**2)


def stress_grad(W):
    """∇_{W_i} L = 8 Σ_j r_ij (W_i − W_j): W_i appears in the (i, j) and the (j, i) terms."""
    diff = W[:, None, :] - W[None, :, :]
    r = jnp.sum(diff**2, axis=-1) - D
    return 8 * jnp.sum(r[:, :, None] * diff, axis=1)


def stress_grad_wrong(W):
    """The classic mistake: only the (i, j) terms counted, so 4 instead of 8."""
    return 0.5 * stress_grad(W)
