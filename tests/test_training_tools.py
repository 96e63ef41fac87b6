"""The training tools: gradient accumulation (`accumulate_steps`), the moving average of the
parameters (`ema.decay`) and rematerialised backbone blocks (`model.remat`)."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jfacerec
from conftest import tiny_config
from jfacerec import models
from jfacerec.core import parallel
from jfacerec.core.checkpoint import Checkpointer
from jfacerec.inference.recognizer import fingerprint
from jfacerec.training import abstract_train_state, make_train_step, train
from jfacerec.training.optimizer import learning_rate_schedule
from jfacerec.training.state import EmaTrainState, TrainState, state_from_config


def first_state_and_step(config):
    """(the state at step 0, the jitted train step) of `config` on one device, 8 classes."""
    mesh = parallel.make_mesh(1)
    model, tx, _ = abstract_train_state(config, 8, mesh)
    state = jax.jit(lambda rng: state_from_config(model, tx, config, rng))(
        jax.random.key(config.seed))
    return state, jax.jit(make_train_step(model, tx, config, mesh))


def run(config, batches):
    """The states after each batch (the first: step 0) and the steps' metrics, on the host."""
    state, step = first_state_and_step(config)
    states, metrics = [jax.device_get(state)], []
    for batch in batches:
        state, m = step(state, batch)
        states.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return states, metrics


def batches(n, size, seed=0):
    """`n` batches of `size` random images [size, 16, 16, 3] with labels among 8 classes."""
    rng = np.random.default_rng(seed)
    return [{"image": rng.standard_normal((size, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 8, size).astype(np.int32)} for _ in range(n)]


@pytest.fixture(scope="module")
def four_of_four_and_one_of_sixteen():
    """Two updates both ways on the same 32 images, with a moving average (GroupNorm: no batch
    statistics, which do differ between four batches of 4 and one of 16)."""
    options = {"optimizer.warmup_steps": 0, "ema.decay": 0.999, "model.norm": "group"}
    big = batches(2, 16)
    small = [{key: b[key][i:i + 4] for key in b} for b in big for i in range(0, 16, 4)]
    accumulated = run(tiny_config(batch_size=4, accumulate_steps=4, total_steps=32, **options),
                      small)
    single = run(tiny_config(batch_size=16, total_steps=8, **options), big)
    return accumulated, single


def test_four_accumulated_batches_of_four_update_the_parameters_as_one_batch_of_sixteen(
        four_of_four_and_one_of_sixteen):
    (acc_states, acc_metrics), (one_states, one_metrics) = four_of_four_and_one_of_sixteen
    for before, after in zip(acc_states[:3], acc_states[1:4]):  # the steps within an update
        chex.assert_trees_all_equal(after.params, before.params)
        chex.assert_trees_all_equal(after.ema_params, before.ema_params)
    for k in (1, 2):
        chex.assert_trees_all_close(acc_states[4 * k].params, one_states[k].params,
                                    rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(acc_states[4 * k].ema_params, one_states[k].ema_params,
                                    rtol=1e-4, atol=1e-6)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one_states[2].params,
                         one_states[0].params)
    assert max(jax.tree.leaves(moved)) > 1e-2  # the comparison is not of two unchanged trees
    # The schedule counted two updates, not eight batches, and the rate logged at each batch is
    # the one its update applied.
    assert optax.tree_utils.tree_get(acc_states[-1].opt_state, "count") == 2
    assert optax.tree_utils.tree_get(acc_states[-1].opt_state, "gradient_step") == 2
    assert optax.tree_utils.tree_get(one_states[-1].opt_state, "count") == 2
    rates = [float(m["learning_rate"]) for m in acc_metrics]
    assert rates == [float(m["learning_rate"]) for m in one_metrics for _ in range(4)]
    assert rates[0] > rates[4] > 0


def test_the_moving_average_follows_its_warmed_up_decay(four_of_four_and_one_of_sixteen):
    _, (states, _) = four_of_four_and_one_of_sixteen
    assert isinstance(states[0], EmaTrainState)
    chex.assert_trees_all_equal(states[0].ema_params, states[0].params)
    average = states[0].ema_params
    for n, state in enumerate(states[1:]):
        decay = min(0.999, (1 + n) / (10 + n))  # 0.1, then 2/11
        average = jax.tree.map(lambda a, p: decay * a + (1 - decay) * p, average, state.params)
        chex.assert_trees_all_close(state.ema_params, average, rtol=1e-5, atol=1e-7)


def test_accumulation_refuses_a_total_that_leaves_batches_without_an_update(tmp_path):
    with pytest.raises(ValueError, match="not a multiple of accumulate_steps 4"):
        train(tiny_config(total_steps=10, accumulate_steps=4), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="accumulate_steps is 0"):
        train(tiny_config(accumulate_steps=0), str(tmp_path / "b"))


class RecordingValidator:
    """Validation that keeps the parameters it was given, by step."""

    best_key = "val/steps/step"
    higher_is_better = True

    def __init__(self):
        self.params = {}

    def __call__(self, variables, step):
        self.params[step] = jax.device_get(variables["params"])
        return {self.best_key: float(step)}


def ema_accumulation_config():
    """12 steps, 3 updates of 4 batches, a checkpoint at step 6 (in the middle of the second),
    validated at steps 6 and 12; PartialFC and centres trained as parameters accumulate too."""
    return tiny_config(total_steps=12, accumulate_steps=4, checkpoint_every_steps=6,
                       keep_checkpoints=3, log_every_steps=1, **{
                           "ema.decay": 0.9, "eval.every_steps": 6,
                           "loss.name": "softmax + 0.01*center", "loss.center.method": "param",
                           "loss.sample_rate": 0.5})


@pytest.fixture(scope="module")
def trained_with_ema_and_accumulation(tmp_path_factory):
    """(workdir, final state, validator) of `ema_accumulation_config`."""
    workdir = str(tmp_path_factory.mktemp("ema") / "w")
    validator = RecordingValidator()
    state = train(ema_accumulation_config(), workdir, validator)
    return workdir, jax.device_get(state), validator


def test_resuming_in_the_middle_of_an_accumulation_is_bit_exact(
        trained_with_ema_and_accumulation, tmp_path):
    workdir, straight, _ = trained_with_ema_and_accumulation
    config = ema_accumulation_config()
    _, _, abstract = abstract_train_state(config, 8, parallel.make_mesh(1))
    saved, _, _ = Checkpointer(workdir, read_only=True).restore(abstract, 6)
    assert optax.tree_utils.tree_get(saved.opt_state, "mini_step") == 2  # two batches accumulated
    resumed_dir = tmp_path / "w"
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "12")
    resumed = train(config, str(resumed_dir), RecordingValidator())
    chex.assert_trees_all_equal(jax.device_get(resumed), straight)
    assert optax.tree_utils.tree_get(straight.opt_state, "count") == 3
    assert optax.tree_utils.tree_get(straight.center_opt_state, "gradient_step") == 3
    assert float(np.abs(straight.centers).max()) > 0


def test_the_learning_rate_changes_once_per_update_of_four_batches(
        trained_with_ema_and_accumulation):
    workdir, _, _ = trained_with_ema_and_accumulation
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["learning_rate"] for r in map(json.loads, f) if "learning_rate" in r]
    schedule = learning_rate_schedule(ema_accumulation_config())
    assert rates == pytest.approx([float(schedule(update)) for update in range(3)
                                   for _ in range(4)])
    assert len(set(rates)) == 3


def test_validation_evaluation_and_load_use_the_moving_average(trained_with_ema_and_accumulation):
    workdir, state, validator = trained_with_ema_and_accumulation
    assert sorted(validator.params) == [6, 12]
    chex.assert_trees_all_equal(validator.params[12], state.ema_params)
    assert fingerprint(state.ema_params) != fingerprint(state.params)
    checkpointer = Checkpointer(workdir, read_only=True)
    assert checkpointer.params_key() == "ema_params"
    abstract = {"params": jax.eval_shape(lambda: state.params), "batch_stats": {}}
    averaged, step = checkpointer.restore_variables(abstract)
    raw, _ = checkpointer.restore_variables(abstract, ema=False)
    assert step == 12
    chex.assert_trees_all_equal(jax.device_get(averaged["params"]), state.ema_params)
    chex.assert_trees_all_equal(jax.device_get(raw["params"]), state.params)
    # jfacerec.load (and evaluate) restore through inference/restore.py's restore_variables.
    assert jfacerec.load(workdir).fingerprint == fingerprint(state.ema_params)


def test_a_checkpoint_with_an_average_is_refused_by_a_config_without_one(
        trained_with_ema_and_accumulation):
    workdir, _, _ = trained_with_ema_and_accumulation
    config = ema_accumulation_config()
    config.ema.decay = 0.0
    _, _, abstract = abstract_train_state(config, 8, parallel.make_mesh(1))
    assert type(abstract) is TrainState
    with pytest.raises(ValueError, match="has a moving average of the parameters"):
        Checkpointer(workdir, read_only=True).restore(abstract)


def model_and_loss(name, remat, **options):
    """(model, loss(params, batch_stats, images) -> (scalar, new batch_stats)) of a small
    `name`."""
    model = models.get_model(name, num_classes=8, embedding_dim=16, width_multiplier=0.25,
                             remat=remat, **options)

    def loss(params, batch_stats, images):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        return jnp.mean(logits ** 2), updates

    return model, loss


def test_rematerialised_blocks_give_the_same_loss_gradients_and_statistics():
    images = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    model, loss = model_and_loss("resnet_tiny", False, norm="batch")
    variables = jax.jit(model.init)(jax.random.key(0), images)
    _, remat_loss = model_and_loss("resnet_tiny", True, norm="batch")
    plain, rematerialised = (jax.jit(jax.value_and_grad(f, has_aux=True))(
        variables["params"], variables["batch_stats"], images) for f in (loss, remat_loss))
    chex.assert_trees_all_close(rematerialised, plain, rtol=1e-5, atol=1e-7)
    assert float(plain[0][0]) > 0


@pytest.mark.parametrize("name", ["mobilefacenet", "mobilenetv2"])
def test_rematerialised_blocks_keep_their_parameter_names(name):
    """So that a checkpoint trained with remat restores without it, and the reverse: these
    backbones name their blocks where nn.remat's class name would change the automatic names."""
    trees = [jax.eval_shape(lambda: model_and_loss(name, remat)[0].init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))) for remat in (False, True)]
    chex.assert_trees_all_equal_shapes_and_dtypes(*trees)


@pytest.mark.parametrize("name", ["resnet_tiny", "iresnet18"])
def test_rematerialised_blocks_keep_fewer_activations_for_the_backward_pass(name):
    """The residuals of the vjp (what the forward pass keeps for the backward one), from shapes
    alone. XLA:CPU's memory analysis does not show the saving (its compiler folds the
    recomputation back into the forward pass); see benchmarks/remat_memory.py."""
    images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    kept = []
    for remat in (False, True):
        model, loss = model_and_loss(name, remat)

        def residuals(images):
            variables = model.init(jax.random.key(0), images)
            return jax.vjp(lambda p: loss(p, variables.get("batch_stats", {}), images)[0],
                           variables["params"])[1]

        kept.append(sum(x.size * x.dtype.itemsize
                        for x in jax.tree.leaves(jax.eval_shape(residuals, images))))
    assert kept[1] < 0.8 * kept[0], kept
