"""create_train_state: one initialisation program, the same state as the parts built one by one."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from diffusion_jax import models, timestep_sampling
from diffusion_jax import train_state as train_state_lib
from diffusion_jax.configs import digits


def _small_model():
    config = digits.get_config()
    config.model.ch_mult = (1,)  # one resolution: 8x8
    return models.get_model(config)


class CreateTrainStateTest(absltest.TestCase):
    def test_equals_the_parts_built_separately(self):
        model = _small_model()
        tx, _ = train_state_lib.create_optimizer(digits.get_config().optim)
        history = timestep_sampling.init_history(10)
        state = train_state_lib.create_train_state(
            model, tx, jax.random.key(7), (8, 8, 1), history, num_extra_ema=2
        )
        # The reference: model.init compiled alone with XLA's default options, then the
        # optimizer's own init and plain copies, outside any program.
        x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
        init = jax.jit(lambda r: model.init({'params': r}, x, t, None, train=False)['params'])
        params = init(jax.random.key(7))
        expected = {
            'params': params,
            'opt_state': tx.init(params),
            'ema_params': params,
            'extra_ema': {'ema_1': params, 'ema_2': params},
            'loss_history': history,
        }
        for name, tree in expected.items():
            got = getattr(state, name)
            self.assertEqual(jax.tree.structure(got), jax.tree.structure(tree), name)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree), strict=True):
                self.assertEqual(a.dtype, b.dtype, name)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        self.assertEqual(int(state.step), 0)

    def test_every_ema_has_buffers_of_its_own(self):
        # The train step donates params: an EMA sharing their buffers would be lost with them.
        model = _small_model()
        tx, _ = train_state_lib.create_optimizer(digits.get_config().optim)
        state = train_state_lib.create_train_state(
            model, tx, jax.random.key(0), (8, 8, 1), num_extra_ema=1
        )
        trees = (state.params, state.ema_params, state.extra_ema['ema_1'])
        for leaves in zip(*(jax.tree.leaves(tree) for tree in trees), strict=True):
            pointers = {leaf.unsafe_buffer_pointer() for leaf in leaves}
            self.assertLen(pointers, 3)

    def test_traced_inside_eval_shape(self):
        model = _small_model()
        tx, _ = train_state_lib.create_optimizer(digits.get_config().optim)
        abstract = jax.eval_shape(
            lambda: train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
        )
        concrete = train_state_lib.create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
        self.assertEqual(
            [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)],
            [(c.shape, c.dtype) for c in jax.tree.leaves(concrete)],
        )


if __name__ == '__main__':
    absltest.main()
