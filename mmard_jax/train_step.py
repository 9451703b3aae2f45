"""The fused train step: augmentation, inner maximization, outer loss, SGD update and BatchNorm statistics in one
jitted program, written per device and mapped over the 'data' mesh axis with `jax.shard_map`.

Semantics do not depend on the device or process count: the loss is the mean over the global batch (a pmean
of per-device means), BatchNorm averages its batch statistics over the axis, and every random draw is keyed
by the example's position in the global batch. With N devices the step computes what one device computes on
the same global batch. The networks a method trains (the student, PeerAiD's peer, CIARD's robust teacher) each have
their own optimizer and are updated from one gradient of the summed loss; teachers are frozen inputs, never saved.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping

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
class NetState:
    """A trained network's variables and optimizer state."""

    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (teachers are inputs of the step, never part of it)."""

    step: Array
    nets: Dict[str, NetState]  # 'student', and 'peer' / 'rteacher' where the method trains one
    method_state: Any
    bad_step: Array  # first step whose loss or gradient was not finite (-1 if none); updates stop there
    swa: Any = None  # swa.SwaState where config.swa is enabled (updated between epochs, never by the step)
    # {term: its methods.core.EpochState state} where the method keeps state across epochs (Fair-ARD's class
    # weights): the step adds to its sums (summed over all devices), the trainer updates it at epoch boundaries.
    epoch_state: Any = None

    @property
    def student(self) -> NetState:
        return self.nets["student"]


@dataclasses.dataclass(frozen=True)
class Networks:
    """The modules of a step: the trained ones (student; peer; rteacher) and the frozen teachers (None where unused).

    Trained modules must be built with `bn_axis_name='data'` (BatchNorm statistics of the global batch)."""

    student: Any
    teacher: Any = None
    teacher2: Any = None
    peer: Any = None
    rteacher: Any = None  # CIARD's robust teacher, trained from the checkpoint of config.teacher

    def trained(self) -> tuple:
        return tuple(n for n in methods.core.TRAINED if getattr(self, n) is not None)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static knobs of the step (config `attack`, `dataset` and `optim.lr`)."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    norm: str = "Linf"  # the inner maximization's ball (engine.NORMS): eps and step_size are in its units
    gaussian_scale: float = 1e-3
    init: str = "gaussian"  # start of x' (engine.INITS)
    student_bn: str = "eval"  # the student's BatchNorm mode during the attack: 'eval' | 'train'
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
    """Learning rate as a function of the step, from optax: cosine annealing to 0 over the run, or
    piecewise-constant (x `decay` at each boundary epoch), or CIARD's per-epoch cosine-times-Gaussian decay from
    one boundary epoch ('cosine_exp'). `per_epoch=True` holds the cosine constant within an
    epoch (PyTorch's CosineAnnealingLR stepped once per epoch); piecewise rates change at epoch starts anyway."""
    if name == "cosine":
        if per_epoch:
            cosine = optax.cosine_decay_schedule(base_lr, num_epochs)
            return lambda step: cosine(jnp.floor_divide(step, steps_per_epoch))
        return optax.cosine_decay_schedule(base_lr, steps_per_epoch * num_epochs)
    if name == "piecewise":
        bounds = {}
        for b in sorted(boundaries_epochs):
            bounds[int(b) * steps_per_epoch] = bounds.get(int(b) * steps_per_epoch, 1.0) * decay
        return optax.piecewise_constant_schedule(base_lr, bounds)
    if name == "cosine_exp":
        # CIARD.py:262-267 (the student, from 1-based epoch 150) and :272-279 (its robust teacher, from 50), per
        # epoch: base until the 0-based epoch b = boundaries[0], then base (1 + cos(pi t)) / 2 exp(-0.01 t^2) with
        # t = (epoch - b) / (num_epochs - 1 - b) (the script's (e - s) / (E - s) at 1-based e = epoch + 1, s = b + 1).
        if len(boundaries_epochs) != 1 or not 0 <= int(boundaries_epochs[0]) < num_epochs - 1:
            raise ValueError(f"lr schedule 'cosine_exp' takes one boundary epoch in [0, {num_epochs - 1}), got "
                             f"{tuple(boundaries_epochs)}")
        b = int(boundaries_epochs[0])

        def cosine_exp(step):
            t = jnp.maximum(jnp.floor_divide(step, steps_per_epoch) - b, 0) / (num_epochs - 1 - b)
            return base_lr * (0.5 + 0.5 * jnp.cos(jnp.pi * t)) * jnp.exp(-0.01 * t * t)

        return cosine_exp
    raise ValueError(f"unknown lr schedule {name!r}; known: cosine, piecewise, cosine_exp")


def init_state(nets: Networks, method: methods.Method, txs: Mapping[str, Any], rng, input_shape,
               swa_init: Callable = None, num_classes: int = 0, initial: Mapping[str, Any] = None) -> TrainState:
    """Initial variables and optimizer states of the trained networks, and the method's state and epoch state
    (for `num_classes`, by default the student's; and, given `swa_init(params, batch_stats)`, the SWA student's
    state from the student's initial variables). `initial`: {network: variables} it starts from instead of a
    random initialization (CIARD's robust teacher: the pretrained checkpoint).

    One jitted program: eager Flax init compiles one small program per parameter (13 s for a ResNet-18 on CPU),
    and eager optax init one per buffer shape (13 for a WRN).
    """

    initial = dict(initial or {})

    def build(rng, initial):
        x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
        states = {}
        for i, name in enumerate(nets.trained()):
            key = rng if name == "student" else jax.random.fold_in(rng, i)
            variables = initial[name] if name in initial else getattr(nets, name).init(key, x, train=False)
            states[name] = NetState(variables["params"], variables.get("batch_stats", {}),
                                    txs[name].init(variables["params"]))
        swa = None if swa_init is None else swa_init(states["student"].params, states["student"].batch_stats)
        epoch_state = None
        if method.epoch_terms:  # classes: given, or the student's logits' width (a shape only: no computation kept)
            classes = num_classes or nets.student.apply(_variables(states["student"]), x, train=False).shape[-1]
            epoch_state = method.init_epoch_state(classes)
        return TrainState(step=jnp.zeros((), jnp.int32), nets=states, method_state=method.init_state(),
                          bad_step=jnp.full((), -1, jnp.int32), swa=swa, epoch_state=epoch_state)

    return jax.jit(build)(rng, initial)


# ----------------------------------------------------------------------------- per-device pieces


def augment_batch(images, labels, idx, key, settings: StepSettings):
    """This device's share of the global batch, cropped and flipped (the global batch's draws, kept by position)."""
    global_b = idx.shape[0] * jax.lax.axis_size(parallel.AXIS)
    pos = parallel.global_positions(idx.shape[0])
    offsets, flips = crop_flip_params(key, global_b, padding=settings.crop_padding, flip=settings.flip)
    x = to_float(crop_and_flip(images[idx], offsets[pos], flips[pos], padding=settings.crop_padding))
    return x, labels[idx]


def _variables(net: NetState, batch_stats=None) -> Dict[str, Any]:
    return {"params": net.params, "batch_stats": net.batch_stats if batch_stats is None else batch_stats}


def inner_constants(nets: Networks, needs, state: TrainState, frozen, x, y=None) -> Dict[str, Array]:
    """The forwards at x that the attack holds constant, in inference mode (T(x) is shared with the outer loss);
    where "t_grad" is needed (SAAD), T(x) and the input gradient of its label logit from one forward and its VJP
    (saad attacks.py:152-163: the gradient of sum_b T_{y_b}(x_b), the teacher in eval mode)."""
    out = {}
    if "inner:s_nat" in needs:
        out["s_nat"] = nets.student.apply(_variables(state.student), x, train=False)
    if "inner:p_nat" in needs:
        out["p_nat"] = nets.peer.apply(_variables(state.nets["peer"]), x, train=False)
    if "inner:t_grad" in needs:
        t_nat, vjp = jax.vjp(lambda z: nets.teacher.apply(frozen["teacher"], z, train=False), x)
        (out["t_grad"],) = vjp(jax.nn.one_hot(y, t_nat.shape[-1], dtype=t_nat.dtype))
        out["t_nat"] = t_nat
    elif {"inner:t_nat", "t_nat"} & needs:
        out["t_nat"] = nets.teacher.apply(frozen["teacher"], x, train=False)
    return out


def adversarial_input(nets: Networks, method: methods.Method, settings: StepSettings, state: TrainState, frozen,
                      x, y, consts, keys):
    """(x', the student's BatchNorm statistics after the attack, correct iterates) from the method's inner objective.

    The statistics move at every iterate when the student attacks in train mode, as SAT, ARD and IAD do. Where the
    method tallies 'correct_iterates' (Fair-ARD.py:64-71), the int32 [B] count of iterates x_0 .. x_{K-1} at which
    the student's logits of that iterate (in the attack's BatchNorm mode) put the label first; None otherwise."""
    count = "correct_iterates" in method.tallies()
    zero = y.astype(jnp.int32) * 0 if count else None  # varying over the data axis, as the counts it starts
    if method.inner.loss is None:
        return x, state.student.batch_stats, zero
    use_teacher = "t_iter" in method.inner.needs
    t_nat = consts.get("t_nat")
    if t_nat is not None and "t_nat" in method.inner.needs:  # ABSLD: T(x) over the class temperatures
        t_nat = method.attack_teacher(state.epoch_state, t_nat, y)

    def objective(z, carry):
        batch_stats, correct = carry
        if settings.student_bn == "train":
            s_adv, upd = nets.student.apply(_variables(state.student, batch_stats), z, train=True,
                                            mutable=["batch_stats"])
            batch_stats = upd["batch_stats"]
        else:
            s_adv = nets.student.apply(_variables(state.student), z, train=False)
        t_adv = nets.teacher.apply(frozen["teacher"], z, train=False) if use_teacher else None
        t_grad = consts.get("t_grad")
        inp = methods.InnerInputs(s_adv, y, t_adv=t_adv, s_nat=consts.get("s_nat"), t_nat=t_nat,
                                  p_nat=consts.get("p_nat"), t_grad=t_grad,
                                  delta=None if t_grad is None else z - x, hp=method.hparams)
        if count:
            correct = correct + (jnp.argmax(jax.lax.stop_gradient(s_adv), axis=-1) == y).astype(jnp.int32)
        return jnp.sum(method.inner.loss(inp)), (batch_stats, correct)

    x_adv, (stats, correct) = engine.pgd(
        objective, x, eps=settings.eps, step_size=settings.step_size, steps=settings.steps, init=settings.init,
        rng=keys, gaussian_scale=settings.gaussian_scale, unroll=settings.unroll,
        carry=(state.student.batch_stats, zero), norm=settings.norm)
    return x_adv, stats, correct


def points(x, x_adv, needed) -> Dict[str, Array]:
    """The inputs of the outer forwards: x, x' and (IGDM) the mirrored point x - (x' - x), not clipped."""
    out = {"nat": x, "adv": x_adv}
    if any(methods.OUTER_FORWARDS[n][1] == "mir" for n in needed):
        out["mir"] = 2.0 * x - x_adv
    return out


def trained_forwards(nets: Networks, order, params, batch_stats, at) -> tuple:
    """The trained networks' train-mode forwards in the method's order: ({name: logits of its first run},
    {network: BatchNorm statistics after the sequence})."""
    logits, batch_stats = {}, dict(batch_stats)
    for name in order:
        net, point = methods.OUTER_FORWARDS[name]
        out, upd = getattr(nets, net).apply({"params": params[net], "batch_stats": batch_stats[net]}, at[point],
                                            train=True, mutable=["batch_stats"])
        batch_stats[net] = upd["batch_stats"]
        logits.setdefault(name, out)
    return logits, batch_stats


def forwards_before_attack(nets: Networks, before, needed, state: TrainState, x):
    """The train-mode forwards at x that run before the attack (CIARD.py:201, :204), in order: ({name: logits of
    its first run, where the loss reads it}, {name: its pullback to the network's parameters}, the state with the
    BatchNorm statistics they moved, which the attack and the later forwards read)."""
    logits, pullbacks, nets_state = {}, {}, dict(state.nets)
    for name in before:
        net = methods.OUTER_FORWARDS[name][0]
        s = nets_state[net]

        def forward(params, s=s, net=net):
            out, upd = getattr(nets, net).apply({"params": params, "batch_stats": s.batch_stats}, x, train=True,
                                                mutable=["batch_stats"])
            return out, upd["batch_stats"]

        if name in needed and name not in logits:
            out, pullback, stats = jax.vjp(forward, s.params, has_aux=True)
            logits[name], pullbacks[name] = out, pullback
        else:
            _, stats = forward(jax.lax.stop_gradient(s.params))
        nets_state[net] = s.replace(batch_stats=stats)
    return logits, pullbacks, state.replace(nets=nets_state)


def frozen_forwards(nets: Networks, needed, frozen, at, consts) -> Dict[str, Array]:
    """The teachers' outer forwards, in inference mode (T(x) reused from the attack's constants)."""
    out = {}
    for name in needed:
        net, point = methods.OUTER_FORWARDS[name]
        if net in methods.core.TRAINED:
            continue
        out[name] = (consts["t_nat"] if name == "t_nat"
                     else getattr(nets, net).apply(frozen[net], at[point], train=False))
    return out


def guarded_update(state: TrainState, nets: Dict[str, NetState], method_state, ok, epoch_state=None) -> TrainState:
    """The next state where the step was finite; otherwise the old one, and `bad_step` records where it broke.

    Hand-written rather than optax's `apply_if_finite`: that one guards parameters only, and a non-finite step
    must not reach the BatchNorm statistics, the method's state or its epoch state either. One `lax.cond` picks
    the whole state rather than a `where` per leaf: XLA:CPU compiles each leaf's select as its own kernel (462 of
    MobileNetV2's step; BENCHMARKS.md "Compile time")."""
    new, old = (nets, method_state, epoch_state), (state.nets, state.method_state, state.epoch_state)
    kept = jax.lax.cond(ok, lambda: new, lambda: old)
    bad = jnp.where((state.bad_step < 0) & ~ok, state.step, state.bad_step)
    return state.replace(step=state.step + 1, nets=kept[0], method_state=kept[1], epoch_state=kept[2], bad_step=bad)


def advance_counts(opt_state, steps=1):
    """An optimizer state with its step counts (its integer leaves: optax's schedule counts) `steps` on and every
    buffer (momentum) unchanged: what a step that does not update the network leaves."""
    return jax.tree.map(lambda a: a + steps if jnp.issubdtype(a.dtype, jnp.integer) else a, opt_state)


def _all_finite(tree) -> Array:
    """Whether every element of every leaf is finite: one reduction over the leaves concatenated (a reduction per
    leaf is a kernel per leaf to compile)."""
    leaves = [jnp.ravel(x) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.isfinite(jnp.concatenate(leaves))) if leaves else jnp.array(True)


def _accuracies(logits: Mapping[str, Array], y) -> Dict[str, Array]:
    names = {"s_adv": "acc_adv", "s_nat": "acc_clean"}
    return {names[k]: jnp.mean(losses.accuracy(v, y)) for k, v in logits.items() if k in names}


# ----------------------------------------------------------------------------- the step


def make_train_step(nets: Networks, method: methods.Method, phase: str, txs: Mapping[str, Any],
                    lr_schedule: Callable, settings: StepSettings, mesh, seed: int, streamed: bool = False):
    """The jitted step `(state, frozen, images, labels, idx, epoch) -> (state, metrics)` of one phase.

    `frozen` holds the teachers' variables by name; `images`/`labels` are the whole training split
    (replicated), `idx` the global batch of split indices (sharded over 'data'). Only the forwards
    `method.forwards(phase)` names are computed. `streamed=True` gives the streamed pipeline's step
    `(state, frozen, images, labels, epoch)`: `images` the global batch already augmented on the CPU (uint8
    [B,H,W,C]) and `labels` int32 [B], both sharded over 'data'; the rest (attack keys included) as above.
    """
    needed, order, forwards = method.outer_needs(phase), method.train_order(phase), method.forwards(phase)
    base_key = jax.random.key(seed)

    before, held = method.pre_attack_order(phase), method.held(phase)

    def step_keys(state: TrainState):
        """(augmentation key, attack-start key) of the step: the streamed step draws the second only, the same."""
        return jax.random.split(jax.random.fold_in(base_key, state.step))

    def per_device_resident(state: TrainState, frozen, images, labels, idx, epoch):
        k_aug, k_init = step_keys(state)
        x, y = augment_batch(images, labels, idx, k_aug, settings)
        return per_device(state, frozen, x, y, epoch, k_init)

    def per_device_streamed(state: TrainState, frozen, images, labels, epoch):
        return per_device(state, frozen, to_float(images), labels, epoch, step_keys(state)[1])

    def per_device(state: TrainState, frozen, x, y, epoch, k_init):
        start = state  # a non-finite step keeps this one (BatchNorm statistics included)
        pre_logits, pre_vjps, state = forwards_before_attack(nets, before, needed, state, x)
        consts = inner_constants(nets, forwards, state, frozen, x, y)
        keys = parallel.example_keys(k_init, parallel.global_positions(x.shape[0]))
        x_adv, s_stats, correct = adversarial_input(nets, method, settings, state, frozen, x, y, consts, keys)
        at = points(x, x_adv, needed | set(order))
        teachers = frozen_forwards(nets, needed, frozen, at, consts)
        lr = lr_schedule(state.step)
        info = methods.StepInfo(epoch=epoch, lr_scale=lr / settings.base_lr, phase=phase, axis_name=parallel.AXIS)
        stats = {n: (s_stats if n == "student" else state.nets[n].batch_stats) for n in state.nets}

        def loss_fn(params, pre):
            trained, new_stats = trained_forwards(nets, order, params, stats, at)
            logits = methods.Logits(**{k: v for k, v in {**trained, **pre, **teachers}.items() if k in needed})
            local, metrics, new_mstate = method.loss(logits, y, state.method_state, info, state.epoch_state)
            # The global loss: mean over devices of per-device batch means (equal local batch sizes).
            return jax.lax.pmean(local, parallel.AXIS), (metrics | _accuracies(trained, y), new_mstate, new_stats,
                                                         jax.lax.stop_gradient(logits))

        params = {n: s.params for n, s in state.nets.items()}
        (loss, (metrics, new_mstate, new_stats, logits)), (grads, pre_grads) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True)(params, pre_logits)
        for name, pullback in pre_vjps.items():  # the pre-attack forwards' share of the gradient
            net = methods.OUTER_FORWARDS[name][0]
            grads[net] = jax.tree.map(jnp.add, grads[net], pullback(pre_grads[name])[0])
        # The epoch states' sums over the global batch (a psum over every device and process).
        new_estate = method.accumulate(state.epoch_state, methods.core.Tally(y, logits, correct), parallel.AXIS)
        # grads are already the gradient of the global loss: shard_map sums the per-device contributions to a
        # replicated input (no extra pmean; docs/design.md, "Data parallelism and multi-host").
        new_nets = {}
        for n, s in state.nets.items():
            if n in held:  # not trained in this phase: no update, no weight decay, no momentum (CIARD.py:291-293);
                # its schedule's step count advances with the run's (the rate is a function of the epoch, :272-282).
                new_nets[n] = NetState(s.params, new_stats[n], advance_counts(s.opt_state))
                continue
            updates, opt_state = txs[n].update(grads[n], s.opt_state, s.params)
            new_nets[n] = NetState(optax.apply_updates(s.params, updates), new_stats[n], opt_state)
        ok = jnp.isfinite(loss) & _all_finite(grads) & (state.bad_step < 0)
        out = {"loss": loss, "lr": lr, **jax.lax.pmean(metrics, parallel.AXIS)}
        return guarded_update(start, new_nets, new_mstate, ok, new_estate), out

    if streamed:
        mapped = jax.shard_map(per_device_streamed, mesh=mesh,
                               in_specs=(P(), P(), P(parallel.AXIS), P(parallel.AXIS), P()), out_specs=(P(), P()))
    else:
        mapped = jax.shard_map(per_device_resident, mesh=mesh,
                               in_specs=(P(), P(), P(), P(), P(parallel.AXIS), P()), out_specs=(P(), P()))
    return jax.jit(mapped, donate_argnums=(0,))
