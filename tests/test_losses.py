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


# ---- margin losses -------------------------------------------------------------------------------

from jfacerec import losses  # noqa: E402
from jfacerec.losses.objectives import parse_terms  # noqa: E402


def random_problem(b=6, d=5, c=4, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (b, d)) * 3.0
    w = jax.random.normal(k2, (d, c))
    y = jax.random.randint(k3, (b,), 0, c)
    return x, w, y


def numpy_cos(x, w):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0))


def numpy_ce(logits, y):
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("loss", [losses.arcface_loss, losses.cosface_loss])
def test_zero_margin_is_scaled_cosine_softmax(loss):
    x, w, y = random_problem()
    want = softmax_cross_entropy(10.0 * losses.cosine_logits(x, w), y)
    np.testing.assert_allclose(loss(x, w, y, scale=10.0, margin=0.0), want, rtol=1e-5)


def test_cosface_against_numpy():
    x, w, y = random_problem()
    cos = numpy_cos(x, w)
    cos[np.arange(len(y)), y] -= 0.35
    np.testing.assert_allclose(losses.cosface_loss(x, w, y, scale=64.0), numpy_ce(64 * cos, y),
                               rtol=1e-4)


def test_arcface_against_numpy():
    x, w, y = random_problem()
    cos = numpy_cos(x, w)
    theta = np.arccos(cos[np.arange(len(y)), y])
    m = 0.5
    target = np.where(theta + m <= np.pi, np.cos(theta + m), np.cos(theta) - m * np.sin(m))
    cos[np.arange(len(y)), y] = target
    np.testing.assert_allclose(losses.arcface_loss(x, w, y), numpy_ce(64 * cos, y), rtol=1e-4)


def test_arcface_target_is_monotone_across_pi_minus_m():
    m = 0.5
    theta = jnp.linspace(0.0, jnp.pi, 4001)
    target = losses.arcface_target(jnp.cos(theta), m)
    assert bool(jnp.all(jnp.diff(target) <= 1e-6))  # never rises as the angle grows
    # The published fallback cos(theta) - m sin(m) meets cos(theta + m) at pi - m only to first
    # order: it sits below it by cos(m) + m sin(m) - 1 (0.117 at m = 0.5), a downward step that
    # keeps the logit monotone.
    before = losses.arcface_target(jnp.cos(jnp.pi - m - 1e-3), m)
    after = losses.arcface_target(jnp.cos(jnp.pi - m + 1e-3), m)
    np.testing.assert_allclose(before - after, np.cos(m) + m * np.sin(m) - 1.0, atol=5e-3)
    # On each side of pi - m the target is continuous: tiny steps in theta move it a tiny amount.
    steps = jnp.abs(jnp.diff(target))
    jump = int(jnp.argmax(steps))
    assert float(jnp.max(jnp.delete(steps, jump))) < 2e-3
    assert abs(float(theta[jump]) - (np.pi - m)) < 2e-3


def test_combined_margin_special_cases():
    x, w, y = random_problem()
    np.testing.assert_allclose(losses.combined_margin_loss(x, w, y, m1=1.0, m2=0.0, m3=0.35),
                               losses.cosface_loss(x, w, y), rtol=1e-5)
    cos = numpy_cos(x, w)
    assert np.all(np.arccos(cos[np.arange(6), y]) + 0.5 <= np.pi)  # no fallback in this batch
    np.testing.assert_allclose(losses.combined_margin_loss(x, w, y, m1=1.0, m2=0.5, m3=0.0),
                               losses.arcface_loss(x, w, y), rtol=1e-5)


def test_sphereface_psi_by_hand():
    m = 4
    for theta in [0.1, 0.9, 1.7, 2.5, 3.1]:
        k = int(np.floor(m * theta / np.pi))
        want = (-1) ** k * np.cos(m * theta) - 2 * k
        np.testing.assert_allclose(losses.sphereface_psi(jnp.float32(theta), m), want, atol=1e-5)
    # psi is continuous and decreasing on [0, pi].
    theta = jnp.linspace(0.0, jnp.pi, 2001)
    psi = losses.sphereface_psi(theta, m)
    assert bool(jnp.all(jnp.diff(psi) <= 1e-6)) and float(jnp.max(jnp.abs(jnp.diff(psi)))) < 0.03


def test_sphereface_against_numpy_with_feature_norm_scale_and_annealing():
    x, w, y = random_problem()
    cos = numpy_cos(x, w)
    norm = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    theta = np.arccos(cos[np.arange(6), y])
    k = np.floor(4 * theta / np.pi)
    psi = (-1) ** k * np.cos(4 * theta) - 2 * k
    for lam in (0.0, 5.0):
        logits = cos.copy()
        logits[np.arange(6), y] = (lam * cos[np.arange(6), y] + psi) / (1 + lam)
        np.testing.assert_allclose(losses.sphereface_loss(x, w, y, anneal_lambda=lam),
                                   numpy_ce(norm[:, None] * logits, y), rtol=1e-4)
    fixed = cos.copy()
    fixed[np.arange(6), y] = psi
    np.testing.assert_allclose(losses.sphereface_loss(x, w, y, scale=30.0),
                               numpy_ce(30.0 * fixed, y), rtol=1e-4)
    with pytest.raises(ValueError, match="integer margin"):
        losses.sphereface_loss(x, w, y, margin=1.5)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined"])
def test_margin_gradients_are_finite_at_cos_plus_and_minus_one(name):
    fn = losses.get_loss(name)
    w = jnp.eye(3)
    for sign in (1.0, -1.0):
        x = sign * jnp.array([[2.0, 0.0, 0.0]])  # cos with class 0 is exactly +-1
        grads = jax.grad(lambda x, w: fn(x, w, jnp.array([0])), argnums=(0, 1))(x, w)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined", "triplet",
                                  "center"])
def test_gradients_match_finite_differences(name):
    jax.config.update("jax_enable_x64", True)
    try:
        x, w, _ = random_problem(b=8, d=5, c=4, seed=3)
        x, w = x.astype(jnp.float64), w.astype(jnp.float64)
        y = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
        fn = losses.get_loss(name)
        if name == "triplet":
            f = lambda x: fn(x, y, margin=0.5, mining="batch_all")  # noqa: E731
        elif name == "center":
            f = lambda x: fn(x, w.T, y)  # noqa: E731
        else:
            f = lambda x: fn(x, w, y)  # noqa: E731
        analytic = jax.grad(f)(x)
        eps = 1e-6
        for i, j in [(0, 0), (3, 2), (7, 4)]:
            dx = jnp.zeros_like(x).at[i, j].set(eps)
            numeric = (f(x + dx) - f(x - dx)) / (2 * eps)
            np.testing.assert_allclose(analytic[i, j], numeric, rtol=1e-4, atol=1e-7)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_label_smoothing_applies_to_margin_losses():
    x, w, y = random_problem()
    cos = numpy_cos(x, w)
    cos[np.arange(6), y] -= 0.35
    logits = 64 * cos
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = np.full((6, 4), 0.2 / 4)
    target[np.arange(6), y] += 0.8
    np.testing.assert_allclose(losses.cosface_loss(x, w, y, label_smoothing=0.2),
                               -(target * logp).sum(1).mean(), rtol=1e-4)


# ---- triplet -------------------------------------------------------------------------------------

def unit(*angles):
    """2-D unit vectors at the given angles (radians): easy distances to reason about."""
    return jnp.array([[np.cos(a), np.sin(a)] for a in angles])


def chord(a):
    return 2 * np.sin(a / 2)  # distance between unit vectors an angle a apart


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    # Identity 0 at angles 0, 0.2, 0.5; identity 1 at 0.6 and 3.0.
    x = unit(0.0, 0.2, 0.5, 0.6, 3.0)
    y = jnp.array([0, 0, 0, 1, 1])
    m = 0.2
    want = [
        max(chord(0.5) - chord(0.6) + m, 0),  # anchor 0: pos 0.5 away, neg 0.6 away
        max(chord(0.3) - chord(0.4) + m, 0),  # anchor 0.2: farthest pos 0.5 (0.3), nearest neg 0.6
        max(chord(0.5) - chord(0.1) + m, 0),  # anchor 0.5: farthest pos 0.0, nearest neg 0.6
        max(chord(2.4) - chord(0.1) + m, 0),  # anchor 0.6: pos 3.0, nearest neg 0.5
        max(chord(2.4) - chord(np.pi - 0.0 - (np.pi - 3.0)) + m, 0),  # anchor 3.0: neg 0.5 (2.5)
    ]
    want[4] = max(chord(2.4) - chord(2.5) + m, 0)
    np.testing.assert_allclose(losses.triplet_loss(x, y, margin=m, mining="batch_hard"),
                               np.mean(want), rtol=1e-5)


def test_batch_all_averages_only_positive_triplets():
    x = unit(0.0, 0.1, 1.0, 0.15)
    y = jnp.array([0, 0, 1, 1])
    m = 0.2
    d = lambda a, b: chord(abs(a - b))  # noqa: E731
    ang = [0.0, 0.1, 1.0, 0.15]
    vals = []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and y[a] == y[p] and y[a] != y[n]:
                    vals.append(max(d(ang[a], ang[p]) - d(ang[a], ang[n]) + m, 0))
    vals = np.array(vals)
    np.testing.assert_allclose(losses.triplet_loss(x, y, margin=m, mining="batch_all"),
                               vals[vals > 0].mean(), rtol=1e-5)


def test_semi_hard_prefers_negatives_in_the_margin_band_then_the_hardest():
    # Anchor 0 at angle 0, its positive at 0.3 (d_ap = chord(0.3) = 0.299).
    # Negatives at 0.35 (in the band) and 0.2 (harder than the positive) and 2.0 (easy).
    x = unit(0.0, 0.3, 0.35, 0.2, 2.0)
    y = jnp.array([0, 0, 1, 2, 3])
    m = 0.2
    # Pair (0 -> 1): band is (0.299, 0.499): negative 0.35 (chord 0.348) -> loss 0.299-0.348+0.2.
    # Pair (1 -> 0): d_ap = 0.299; negatives from 0.3: 0.35 -> 0.05, 0.2 -> 0.1, 2.0 -> 1.7;
    #   band (0.299, 0.499): none -> hardest negative chord(0.05) -> loss 0.299 - 0.05 + 0.2.
    want = [chord(0.3) - chord(0.35) + m, chord(0.3) - chord(0.05) + m]
    np.testing.assert_allclose(losses.triplet_loss(x, y, margin=m, mining="semi_hard"),
                               np.mean(want), rtol=1e-4)


def test_triplet_without_valid_triplets_is_zero_and_unknown_mining_is_refused():
    x = unit(0.0, 1.0)
    assert float(losses.triplet_loss(x, jnp.array([0, 1]))) == 0.0
    with pytest.raises(ValueError, match="mining"):
        losses.triplet_loss(x, jnp.array([0, 1]), mining="nope")


def test_explicit_triplets():
    a, p, n = unit(0.0, 0.0), unit(0.3, 0.1), unit(0.4, 2.0)
    want = np.mean([max(chord(0.3) - chord(0.4) + 0.2, 0), max(chord(0.1) - chord(2.0) + 0.2, 0)])
    np.testing.assert_allclose(losses.explicit_triplet_loss(a, p, n, margin=0.2), want, rtol=1e-5)


# ---- center --------------------------------------------------------------------------------------

def test_center_loss_and_update_by_hand():
    x = jnp.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y = jnp.array([0, 0, 1])
    c = jnp.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    # |x - c|^2 = 1, 9, 4 -> 0.5 * mean = 0.5 * 14 / 3.
    np.testing.assert_allclose(losses.center_loss(x, c, y), 0.5 * 14 / 3, rtol=1e-6)
    # Class 0: n=2, delta = (2 c0 - (x0 + x1)) / 3 = (-4, 0) / 3; class 1: (0 - (0, 2)) / 2;
    # class 2 is absent: unchanged.
    new = losses.center_update(c, x, y, alpha=0.5)
    np.testing.assert_allclose(new, [[2 / 3, 0.0], [0.0, 0.5], [5.0, 5.0]], rtol=1e-6)


# ---- every loss under jit and grad, and the joint objective ------------------------------------

@pytest.mark.parametrize("name", ["softmax", "arcface", "cosface", "sphereface", "combined",
                                  "triplet", "center"])
def test_every_loss_jits_and_differentiates(name):
    x, w, y = random_problem()
    fn = get_loss(name)
    call = {
        "softmax": lambda x: fn(x @ w, y, label_smoothing=0.1),
        "triplet": lambda x: fn(x, y, mining="semi_hard"),
        "center": lambda x: fn(x, w.T, y),
    }.get(name, lambda x: fn(x, w, y, label_smoothing=0.1))
    value, grad = jax.jit(jax.value_and_grad(call))(x)
    assert value.shape == () and value.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_joint_objective_expression():
    assert parse_terms("0.7*softmax + 0.3*triplet") == [(0.7, "softmax"), (0.3, "triplet")]
    assert parse_terms("softmax+0.01*center") == [(1.0, "softmax"), (0.01, "center")]
    with pytest.raises(ValueError, match="registered"):
        parse_terms("softmax + 0.3*tripplet")
    with pytest.raises(ValueError, match="twice"):
        parse_terms("softmax + softmax")
    with pytest.raises(ValueError, match="cannot read"):
        parse_terms("softmax * 2")
