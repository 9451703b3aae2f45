"""The fused train step: augmentation, inner maximization, outer loss, SGD update and BN statistics in one
jitted program, written per device and mapped over the 'data' mesh axis with `jax.shard_map`.

Semantics do not depend on the device count: the loss is the mean over the global batch (a pmean of
per-device means), BatchNorm averages its batch statistics over the axis, and every random draw is
keyed by the example's position in the global batch. With N devices the step computes what one
device computes on the same global batch.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from mmard_jax import losses, methods, parallel
from mmard_jax.attacks import engine
from mmard_jax.data.augment import crop_and_flip, crop_flip_params, to_float

Array = jax.Array


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the teacher is not here: it is an input, never saved)."""

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    method_state: Any
    bad_step: Array  # first step whose loss or gradient was not finite (-1 if none); updates stop there


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static knobs of the step (from the config)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    gaussian_scale: float = 1e-3
    unroll: Any = 1
    crop_padding: int = 4
    flip: bool = True
    base_lr: float = 0.1


def make_optimizer(lr_schedule: Callable, momentum: float = 0.9, weight_decay: float = 2e-4, nesterov: bool = False):
    """SGD with momentum and coupled weight decay on every parameter, as PyTorch's `optim.SGD`.

    PyTorch adds wd * p to the gradient before the momentum buffer; `add_decayed_weights` before
    `sgd` does the same (optax's trace starts at zero, so the first buffer is the gradient, as in torch).
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(lr_schedule, momentum=momentum if momentum else None, nesterov=nesterov),
    )


def make_lr_schedule(base_lr: float, steps_per_epoch: int, num_epochs: int, name: str = "cosine",
                     boundaries_epochs=(), decay: float = 0.1, per_epoch: bool = False) -> Callable:
    """Learning rate as a function of the step: cosine annealing to 0 over the run, or piecewise-constant.

    `per_epoch=True` holds the rate constant within an epoch (PyTorch's CosineAnnealingLR stepped
    once per epoch); the default anneals smoothly per step.
    """
    def epoch_of(step):
        return jnp.floor_divide(step, steps_per_epoch) if per_epoch else step / steps_per_epoch

    if name == "cosine":
        def schedule(step):
            t = epoch_of(step) / num_epochs
            return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
    elif name == "piecewise":
        bounds = jnp.asarray(sorted(boundaries_epochs), jnp.float32)

        def schedule(step):
            e = jnp.floor_divide(step, steps_per_epoch)
            return base_lr * decay ** jnp.sum(e >= bounds)
    else:
        raise ValueError(f"unknown lr schedule {name!r}; known: cosine, piecewise")
    return schedule


def init_state(student, method: methods.Method, tx, rng, input_shape) -> TrainState:
    """Initial student variables, optimizer and method state.

    Jitted: eager Flax init compiles one small program per parameter (13 s for a ResNet-18 on CPU).
    """
    variables = jax.jit(functools.partial(student.init, train=False))(rng, jnp.zeros((1,) + tuple(input_shape), jnp.float32))
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        method_state=method.init_state(),
        bad_step=jnp.full((), -1, jnp.int32),
    )


def _all_finite(tree) -> Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def make_train_step(
    student,
    teacher,
    teacher2,
    method: methods.Method,
    phase: str,
    tx,
    lr_schedule: Callable,
    settings: StepSettings,
    mesh,
    seed: int,
):
    """Builds the jitted step `(state, teacher_vars, teacher2_vars, images, labels, idx, epoch) -> (state, metrics)`.

    `images`/`labels` are the whole training split on every device (uint8, replicated); `idx` the
    global batch of split indices (sharded over 'data'). `student` must be built with
    `bn_axis_name='data'`. Only the forwards `method.forwards(phase)` names are computed.
    """
    needs = method.forwards(phase)
    inner, outer, hp = method.inner, method.outer, method.hparams
    base_key = jax.random.key(seed)

    def per_device(state: TrainState, t_vars, t2_vars, images, labels, idx, epoch):
        local_b = idx.shape[0]
        global_b = local_b * jax.lax.axis_size(parallel.AXIS)
        pos = parallel.global_positions(local_b)
        k_aug, k_init = jax.random.split(jax.random.fold_in(base_key, state.step))

        # Augmentation: draw the global batch's crops/flips everywhere (tiny), keep this device's.
        offsets, flips = crop_flip_params(k_aug, global_b, padding=settings.crop_padding, flip=settings.flip)
        x = to_float(crop_and_flip(images[idx], offsets[pos], flips[pos], padding=settings.crop_padding))
        y = labels[idx]

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        s_eval = lambda z: student.apply(variables, z, train=False)  # noqa: E731
        t_eval = lambda z: teacher.apply(t_vars, z, train=False)  # noqa: E731

        # The teacher at x is computed once and shared by the inner and the outer objective.
        t_nat = t_eval(x) if ({"t_nat", "inner:t_nat"} & needs) else None

        if inner.loss is None:
            x_adv = x
        else:
            s_nat_eval = s_eval(x) if "inner:s_nat" in needs else None

            def objective(z):
                t_iter = t_eval(z) if "inner:t_iter" in needs else None
                inp = methods.InnerInputs(s_eval(z), y, t_adv=t_iter, s_nat=s_nat_eval, t_nat=t_nat)
                return jnp.sum(inner.loss(inp))

            x_adv = engine.pgd(
                objective, x, eps=settings.eps, step_size=settings.step_size, steps=settings.steps,
                init=inner.init, rng=parallel.example_keys(k_init, pos),
                gaussian_scale=settings.gaussian_scale, unroll=settings.unroll,
            )

        t_adv = t_eval(x_adv) if "t_adv" in needs else None
        t2_nat = teacher2.apply(t2_vars, x, train=False) if "t2_nat" in needs else None
        lr = lr_schedule(state.step)
        info = methods.StepInfo(epoch=epoch, lr_scale=lr / settings.base_lr, axis_name=parallel.AXIS)

        def loss_fn(params):
            batch_stats = state.batch_stats
            s_adv = s_nat = None
            if "s_adv" in needs:
                s_adv, upd = student.apply({"params": params, "batch_stats": batch_stats}, x_adv, train=True, mutable=["batch_stats"])
                batch_stats = upd["batch_stats"]
            if "s_nat" in needs:
                s_nat, upd = student.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
                batch_stats = upd["batch_stats"]
            logits = methods.Logits(s_adv=s_adv, s_nat=s_nat, t_nat=t_nat, t_adv=t_adv, t2_nat=t2_nat)
            local, metrics, new_mstate = outer.loss(logits, y, state.method_state, hp, info)
            # The global loss: mean over devices of per-device batch means (equal local batch sizes).
            loss = jax.lax.pmean(local, parallel.AXIS)
            return loss, (metrics, new_mstate, batch_stats, s_adv, s_nat)

        (loss, (metrics, new_mstate, new_bs, s_adv, s_nat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # grads are already the gradient of the global loss: shard_map sums the per-device
        # contributions to a replicated input (no extra pmean, DESIGN §6).
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)

        ok = jnp.isfinite(loss) & _all_finite(grads) & (state.bad_step < 0)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            batch_stats=keep(new_bs, state.batch_stats),
            opt_state=keep(new_opt, state.opt_state),
            method_state=keep(new_mstate, state.method_state),
            bad_step=jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step),
        )

        out = {"loss": loss, "lr": lr}
        out.update({k: jax.lax.pmean(v, parallel.AXIS) for k, v in metrics.items()})
        if s_adv is not None:
            out["acc_adv"] = jax.lax.pmean(jnp.mean(losses.accuracy(s_adv, y)), parallel.AXIS)
        if s_nat is not None:
            out["acc_clean"] = jax.lax.pmean(jnp.mean(losses.accuracy(s_nat, y)), parallel.AXIS)
        return new_state, out

    mapped = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(), P(parallel.AXIS), P()),
        out_specs=(P(), P()),
    )
    return jax.jit(mapped, donate_argnums=(0,))
