"""Stochastic weight averaging of the student (`config.swa`), as PeerAiD and SAAD publish it.

At the end of every epoch from `start_epoch` on, the SWA student's parameters become the equal-weight running
mean of the student's parameters after each of those epochs, and its BatchNorm statistics are then recomputed
by one pass over the augmented training split in train mode, as a cumulative average of the batches' statistics:

- PeerAiD (jaewonalive/PeerAiD @cd12e92): `main.py:427-432` after each epoch >= `swa_s_start`:
  `moving_average(swa, student, 1 / (n + 1))` (`utils/SWA.py:25-28`: `p_swa * (1 - a) + p * a`, parameters
  only), then `bn_update(train_loader, swa)` (`utils/SWA.py:61-88`: train mode, running mean/var reset to 0/1,
  momentum `b / (n + b)` per batch, i.e. the example-weighted cumulative mean of the batch statistics);
  `swa_s_start` is the student's first learning-rate decay epoch (`main.py:110-111`, 0-based as its loop).
- SAAD (HongsinLee/saad @295121c): `saad.py:41` `AveragedModel(student)` (equal-weight mean of the parameters),
  `saad.py:91-94` after each 1-based epoch >= `--swa_epoch` (95, `args.py:17`): `update_parameters` then
  torch's `update_bn(trainloader, swa_model)` (momentum None: the batch-weighted cumulative mean).

Both pass over full-size shuffled, augmented batches here (the trainer's drop of the last partial batch,
docs/design.md "Deviations" 18), where their two weightings are the same average. The running variance
averages the unbiased batch variances (x n / (n - 1)), as PyTorch's BatchNorm does in both passes.

The SWA state (`SwaState`) is part of the train state: replicated on every device, checkpointed and resumed
bitwise like the parameters.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from mmard_jax import parallel, train_step
from mmard_jax.errors import ConfigError

# The randomness of the BN pass (its example order and augmentation) is its own stream, apart from training's.
BN_STREAM = 0x5A4  # "SWA"
FIRST_DECAY = -1  # `swa.start_epoch` value: the first learning-rate boundary (PeerAiD main.py:110-111)


@flax.struct.dataclass
class SwaState:
    """The SWA student: the running mean of the student's parameters, its recomputed BatchNorm statistics and the
    number of parameter snapshots averaged so far (0: not started; the variables are then the initial student's)."""

    params: Any
    batch_stats: Any
    count: jax.Array


def block(enabled: bool = False, start_epoch: int = FIRST_DECAY, every_epochs: int = 1,
          bn_recompute: bool = True) -> dict:
    """The `config.swa` block's fields (config_lib builds the ConfigDict).

    enabled: keep an SWA student; start_epoch: the 0-based epoch whose end-of-epoch weights are averaged first
    (-1: the first boundary of `optim.boundaries`); every_epochs: average after every this many epochs (1 in both
    published codes); bn_recompute: recompute its BatchNorm statistics after each average (both do)."""
    return {"enabled": enabled, "start_epoch": start_epoch, "every_epochs": every_epochs,
            "bn_recompute": bn_recompute}


def resolve_start(config) -> int:
    """The 0-based first averaged epoch of a config (-1 resolved to the first learning-rate boundary)."""
    start = int(config.swa.start_epoch)
    if start == FIRST_DECAY:
        bounds = sorted(int(b) for b in config.optim.boundaries) if config.optim.schedule == "piecewise" else []
        if not bounds:
            raise ConfigError("config.swa.start_epoch=-1 (the first learning-rate decay) needs "
                              "config.optim.schedule='piecewise' with config.optim.boundaries; set "
                              "--config.swa.start_epoch to an epoch (0-based)")
        return bounds[0]
    if start < 0:
        raise ConfigError(f"config.swa.start_epoch={start}: give a 0-based epoch, or -1 for the first lr decay")
    return start


def check(config) -> None:
    """The swa block's one-line errors (before training)."""
    if not config.swa.enabled:
        return
    start = resolve_start(config)
    if start >= config.num_epochs:
        raise ConfigError(f"config.swa.start_epoch resolves to epoch {start} (0-based) but the run has "
                          f"{config.num_epochs} epochs: the SWA student would never be averaged")
    if int(config.swa.every_epochs) < 1:
        raise ConfigError(f"config.swa.every_epochs={config.swa.every_epochs}: give a positive number of epochs")


def due(config, epochs_done: int) -> bool:
    """Whether the weights after `epochs_done` epochs (1-based count) are averaged into the SWA student."""
    if not config.swa.enabled:
        return False
    since = epochs_done - 1 - resolve_start(config)
    return since >= 0 and since % int(config.swa.every_epochs) == 0


def expected_count(config, epochs_done: int) -> int:
    """How many snapshots the SWA student holds after `epochs_done` epochs (a resume checks it is up to date)."""
    return sum(due(config, e) for e in range(1, epochs_done + 1))


def init(student_params, student_stats) -> SwaState:
    """A fresh SWA state: the student's initial variables (replaced whole by the first average) and count 0."""
    return SwaState(params=jax.tree.map(jnp.copy, student_params), batch_stats=jax.tree.map(jnp.copy, student_stats),
                    count=jnp.zeros((), jnp.int32))


def average(swa: SwaState, params) -> SwaState:
    """One more snapshot in the equal-weight running mean: `optax.incremental_update` is PeerAiD's
    `moving_average` (`p * a + p_swa * (1 - a)`, utils/SWA.py:25-28) with a = 1 / (count + 1) (main.py:430); the
    first snapshot (a = 1) replaces the initial variables."""
    rate = 1.0 / (swa.count.astype(jnp.float32) + 1.0)
    return swa.replace(params=optax.incremental_update(params, swa.params, rate), count=swa.count + 1)


def bn_batches(seed: int, epoch: int, n: int, batch_size: int) -> np.ndarray:
    """The BN pass's index batches after `epoch` (0-based): a fresh shuffle of full batches keyed by (seed, epoch)
    in the pass's own stream, as the published passes draw a fresh shuffled epoch of the train loader."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), BN_STREAM])))
    steps = n // batch_size
    return rng.permutation(n).astype(np.int32)[: steps * batch_size].reshape(steps, batch_size)


def _cumulative_bn(rate):
    """A Flax method interceptor: every train-mode BatchNorm sets its running statistics to
    `(1 - rate) * old + rate * batch` (PyTorch's update with momentum `rate`), the variance being the unbiased
    batch variance over the global batch, as PyTorch's BatchNorm keeps it."""

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if not isinstance(mod, nn.BatchNorm) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if nn.merge_param("use_running_average", mod.use_running_average, kwargs.get("use_running_average")):
            return next_fun(*args, **kwargs)
        x = jnp.asarray(args[0], jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean, mean_sq = x.mean(axes), jnp.square(x).mean(axes)
        n = int(np.prod(x.shape[:-1]))
        if mod.axis_name is not None:
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), mod.axis_name)
            n *= jax.lax.axis_size(mod.axis_name)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0) * (n / (n - 1))  # Flax's batch variance, unbiased
        old_mean, old_var = mod.get_variable("batch_stats", "mean"), mod.get_variable("batch_stats", "var")
        out = next_fun(*args, **kwargs)
        mod.put_variable("batch_stats", "mean", (1.0 - rate) * old_mean + rate * mean)
        mod.put_variable("batch_stats", "var", (1.0 - rate) * old_var + rate * var)
        return out

    return interceptor


def reset_stats(batch_stats):
    """PeerAiD's `reset_bn` (utils/SWA.py:48-51) and torch's `reset_running_stats`: means 0, variances 1."""
    return {k: reset_stats(v) if isinstance(v, dict) else (jnp.ones_like(v) if k == "var" else jnp.zeros_like(v))
            for k, v in batch_stats.items()}


def bn_forward(module, params, batch_stats, x, rate):
    """One train-mode forward that moves the running statistics by `rate` (see `_cumulative_bn`)."""
    with nn.intercept_methods(_cumulative_bn(rate)):
        _, upd = module.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
    return upd["batch_stats"]


def make_bn_pass(module, settings, mesh, seed: int):
    """The jitted BN recompute `(params, batch_stats, images, labels, idx [steps, B], epoch) -> batch_stats`: the
    statistics reset, then one train-mode forward per augmented batch with rate 1 / (k + 1) for the k-th batch
    (0-based; equal batches, so this is also PeerAiD's b / (n + b)). `module` is built with
    `bn_axis_name='data'` (the step's student) so a batch's statistics are the global batch's on any device count;
    the augmentation is training's (`train_step.augment_batch`) with keys from (seed, epoch, batch)."""
    base = jax.random.fold_in(jax.random.key(seed), BN_STREAM)

    def per_device(params, batch_stats, images, labels, idx, epoch):
        key = jax.random.fold_in(base, epoch)

        def body(k, stats):
            x, _ = train_step.augment_batch(images, labels, idx[k], jax.random.fold_in(key, k), settings)
            return bn_forward(module, params, stats, x, 1.0 / (k.astype(jnp.float32) + 1.0))

        return jax.lax.fori_loop(0, idx.shape[0], body, reset_stats(batch_stats))

    mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(), P(None, parallel.AXIS), P()),
                           out_specs=P())
    return jax.jit(mapped)


def variables(swa: Optional[SwaState]):
    """The SWA student's variables for evaluation and checkpoints."""
    return {"params": swa.params, "batch_stats": swa.batch_stats}
