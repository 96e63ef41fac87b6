import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfacerec.losses import get_loss, softmax_cross_entropy


def test_softmax_cross_entropy_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels = jnp.array([0, 1])
    # -log softmax: row 0 label 0, row 1 label 1.
    row0 = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0) + 1.0))
    row1 = -(0.0 - np.log(2.0 + np.exp(3.0)))
    np.testing.assert_allclose(softmax_cross_entropy(logits, labels), (row0 + row1) / 2, rtol=1e-6)


def test_label_smoothing_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.0]])
    eps = 0.3
    logp = np.array([2.0, 1.0, 0.0]) - np.log(np.exp(2.0) + np.exp(1.0) + 1.0)
    target = np.array([1 - eps + eps / 3, eps / 3, eps / 3])
    np.testing.assert_allclose(softmax_cross_entropy(logits, jnp.array([0]), label_smoothing=eps),
                               -(target * logp).sum(), rtol=1e-6)


def test_jit_grad_and_registry():
    loss = get_loss("softmax")
    logits = jax.random.normal(jax.random.key(0), (4, 5))
    labels = jnp.array([0, 1, 2, 3])
    g = jax.jit(jax.grad(lambda z: loss(z, labels, label_smoothing=0.1)))(logits)
    # d/dz mean CE = (softmax - target) / batch.
    target = jax.nn.one_hot(labels, 5) * 0.9 + 0.1 / 5
    np.testing.assert_allclose(g, (jax.nn.softmax(logits) - target) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="registered"):
        get_loss("unknown")
    with pytest.raises(ValueError, match="label_smoothing"):
        softmax_cross_entropy(logits, labels, label_smoothing=1.0)
