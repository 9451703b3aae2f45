"""The JAX AutoAttack's invariants: feasibility of every component's output, the worst case over components,
independence from the device count, batch size and cascade order, the FAB projection against a linear
program, and the trust checks (gradient masking flags) on a masked and on a normal model.

Agreement with a peer implementation on the same weights is in test_attacks_peer.py; its trained model and
its standard-settings evaluation are reused here (cached per process).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

import tolerances
from mmard_jax import batch_plan, evaluate, evaluator, parallel
from mmard_jax.attacks import apgd, autoattack, fab, square, suite
from mmard_jax.tools import aa_bench
from test_attacks_peer import EPS, TinyMLP, digits_test_split, our_report, robust_mlp

# Few iterations: these tests check mechanics; the standard settings run in test_attacks_peer.py.
SMALL = dataclasses.replace(autoattack.STANDARD, n_iter=10, n_target_classes=3, square_queries=300)


def lp_projection(t, w, b):
    """min ||d||_inf s.t. <w, t + d> = b, 0 <= t + d <= 1, by scipy's HiGHS; None when infeasible."""
    n = len(t)
    c = np.r_[np.zeros(n), 1.0]  # variables (d, s): minimize s
    eye = np.eye(n)
    a_ub = np.block([[eye, -np.ones((n, 1))], [-eye, -np.ones((n, 1))]])  # d - s <= 0, -d - s <= 0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None], b_eq=[b - w @ t],
                  bounds=[(-ti, 1 - ti) for ti in t] + [(0, None)], method="highs")
    return res.x[:n] if res.status == 0 else None


def test_fab_projection_matches_linear_program():
    rng = np.random.default_rng(0)
    n, dim = 64, 12
    t = rng.uniform(0, 1, (n, dim)).astype(np.float32)
    t[:, :3] = np.round(t[:, :3])  # pixels on the box faces
    w = rng.normal(size=(n, dim)).astype(np.float32)
    w[:, 3] = 0.0  # a coordinate the hyperplane ignores
    b = (np.sum(w * t, 1) + rng.normal(scale=2.0, size=n)).astype(np.float32)  # some hyperplanes out of reach
    d = np.asarray(fab.project_linf_box(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b)))
    infeasible = 0
    for i in range(n):
        ref = lp_projection(t[i].astype(np.float64), w[i].astype(np.float64), float(b[i]))
        if ref is None:  # out of reach: every coordinate the hyperplane sees moves to its box side
            infeasible += 1
            side = np.sign(w[i] @ t[i] - b[i])
            want = np.where(w[i] == 0, 0.0, np.where(-side * np.sign(w[i]) > 0, 1 - t[i], -t[i]))
            np.testing.assert_allclose(d[i], want, atol=1e-6)
            continue
        np.testing.assert_allclose(np.abs(d[i]).max(), np.abs(ref).max(), rtol=1e-4, atol=1e-6)
        assert abs(w[i] @ (t[i] + d[i]) - b[i]) < 1e-4
        assert np.all(t[i] + d[i] >= -1e-6) and np.all(t[i] + d[i] <= 1 + 1e-6)
        assert d[i][3] == 0.0
    assert 0 < infeasible < n  # both cases were exercised


@pytest.fixture(scope="module")
def batch():
    module, variables = robust_mlp()
    images, labels, x, _, _ = digits_test_split()
    n = 64
    return module, variables, jnp.asarray(x[:n]), jnp.asarray(labels[:n])


@pytest.mark.parametrize("name", autoattack.COMPONENTS)
def test_component_outputs_are_feasible_and_fool(batch, name):
    module, variables, x, y = batch
    apply_fn = lambda z: module.apply(variables, z)  # noqa: E731
    keys = parallel.example_keys(jax.random.key(0), jnp.arange(len(y)))
    run = jax.jit(lambda x, y, keys, r: autoattack.run_component(name, apply_fn, x, y, keys, r, eps=EPS, config=SMALL))
    x_adv, fooled = run(x, y, keys, jnp.int32(0))
    x_adv, fooled = np.asarray(x_adv), np.asarray(fooled)
    assert np.abs(x_adv - np.asarray(x)).max() <= EPS + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    wrong = np.asarray(jnp.argmax(apply_fn(jnp.asarray(x_adv)), -1)) != np.asarray(y)
    clean_wrong = np.asarray(jnp.argmax(apply_fn(x), -1)) != np.asarray(y)
    assert np.all(wrong[fooled])  # every reported success is a real, verified one
    assert np.all(x_adv[~fooled] == np.asarray(x)[~fooled])  # unfooled examples come back untouched
    assert fooled[~clean_wrong].sum() > 0  # and the attack does fool some correctly classified points
    x_again, fooled_again = run(x, y, keys, jnp.int32(0))
    np.testing.assert_array_equal(x_again, x_adv)  # reproducible from the keys
    np.testing.assert_array_equal(fooled_again, fooled)


def test_apgd_ce_and_apgd_t_share_one_program(batch):
    """APGD's shared program (a traced loss switch) gives each component what its own function gives."""
    module, variables, x, y = batch
    apply_fn = lambda z: module.apply(variables, z)  # noqa: E731
    keys = parallel.example_keys(jax.random.key(1), jnp.arange(len(y)))
    shared = jax.jit(lambda rank: apgd.apgd_ce_or_targeted(apply_fn, x, y, keys, rank, eps=EPS, n_iter=10))
    alone = {0: jax.jit(lambda: apgd.apgd_ce(apply_fn, x, y, keys, eps=EPS, n_iter=10)),
             3: jax.jit(lambda: apgd.apgd_targeted(apply_fn, x, y, keys, 3, eps=EPS, n_iter=10))}
    for rank, fn in alone.items():
        (x_shared, fooled_shared), (x_alone, fooled_alone) = shared(jnp.int32(rank)), fn()
        np.testing.assert_array_equal(fooled_shared, fooled_alone, err_msg=f"rank {rank}")
        np.testing.assert_allclose(x_shared, x_alone, atol=1e-6, err_msg=f"rank {rank}")
        assert 0 < np.asarray(fooled_alone).sum() < len(y)
    assert autoattack.PROGRAMS["apgd_ce"] == autoattack.PROGRAMS["apgd_t"]


def test_square_in_chunks_with_compaction_equals_one_run():
    """Square run by the evaluator in short chunks of queries, the fooled examples dropped between chunks
    (the batch of 32 shrinks to 8), gives every example what one run of all the queries over one batch of the
    whole split gives: the same fooled mask, and the same final margin up to float32 rounding (batches of that size,
    32 and 8 block the matrix products differently: tests/tolerances.py). A query accepted in one run and not in
    the other would move a margin by far more than that rounding, so the margins also pin the trajectory; the
    final margins are clear of 0 by more than the rounding, so the fooled decision cannot flip with it."""
    module, variables = robust_mlp()
    images, labels, *_ = digits_test_split()
    config = dataclasses.replace(SMALL, square_queries=300)
    key = jax.random.fold_in(suite.aa_key(0), autoattack.COMPONENTS.index("square"))
    one_run = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=356, progress=False, aa_config=config,
                                  square_chunks=(300, 300))
    correct = np.flatnonzero(one_run.correct(variables, "clean"))
    fooled_all, want, _ = one_run.square_points(variables, correct, key, run=0)
    (whole,) = one_run._compiled["aa", "square"]  # one batch of every clean-correct example
    assert whole >= len(correct)
    # 26 examples that the run fools and 6 it does not, in split order.
    pick = np.sort(np.r_[np.flatnonzero(fooled_all)[:26], np.flatnonzero(~fooled_all)[:6]])
    todo, want = correct[pick], want[pick]

    chunked = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=32, progress=False, aa_config=config,
                                  square_chunks=(3, 40))
    seen = []
    fooled, margin, _ = chunked.square_points(variables, todo, key, run=0, progress=lambda n, _: seen.append(n))
    # The still-unfooled examples were re-batched smaller: down to 8 once 7 are left (a 16 would pad more
    # than 2x); the shapes in between depend on measured times (plan_batches).
    assert {32, 8} <= chunked._compiled["aa", "square"]
    scale = np.abs(np.asarray(module.apply(variables, jnp.asarray(images[todo] / 255.0, jnp.float32)))).max()
    tolerances.assert_clear_of_zero(want, tolerances.reorder_atol(scale), "final margins")
    np.testing.assert_array_equal(fooled, fooled_all[pick])
    tolerances.assert_close_reordered(margin, want, scale, "final margins, chunked vs one run")
    assert seen[0] < 16 < seen[-1] == fooled.sum() == 26  # fooled over several chunks


def test_a_first_call_is_planned_with_its_stand_in_s_costs():
    """Square's first chunk, with no timing of its own, is planned with the clean pass's costs (`Program.cost_like`:
    a query is one forward): priced at 1 s per example and forward and free compilations, 37 points go in batches
    of 32 and 6 at once, where without them they are padded into one batch of 48; the outcome is the same. FAB-T's
    first run is planned like APGD's."""
    module, variables = robust_mlp()
    images, labels, *_ = digits_test_split()
    config = dataclasses.replace(SMALL, square_queries=4)
    key, todo = jax.random.fold_in(suite.aa_key(0), autoattack.COMPONENTS.index("square")), np.arange(37)
    runs = {}
    for primed in (False, True):
        ev = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=64, progress=False, aa_config=config,
                                 square_chunks=(4, 4))
        ev.measured_caps[True] = 64  # no timed cap probe (its choice depends on this machine's timings)
        if primed:
            ev._costs["white_box", "clean"] = (1.0, 0.0)
        runs[primed] = ev.square_points(variables, todo, key)
        assert ev._compiled["aa", "square"] == ({32, 6} if primed else {48})
        sizes = [32, 6] if primed else [48]  # the plan log records the call: its batches, the shapes it compiled
        assert [{k: e[k] for k in ("program", "points", "sizes", "compiled")} for e in ev.plan_log] == [
            {"program": "aa/square", "points": 37, "sizes": sizes, "compiled": sorted(sizes)}]
    # Batches of 48 and of 32 + 6 round the logits differently: the margins agree to that rounding and stay clear of
    # 0 by more, so the fooled decisions compared below cannot flip with it (as in the chunked test above).
    scale = np.abs(np.asarray(module.apply(variables, jnp.asarray(images[todo] / 255.0, jnp.float32)))).max()
    tolerances.assert_clear_of_zero(runs[False].margin, tolerances.reorder_atol(scale), "final margins")
    tolerances.assert_close_reordered(runs[True].margin, runs[False].margin, scale, "final margins, 32 + 6 vs 48")
    np.testing.assert_array_equal(runs[True].fooled, runs[False].fooled)
    assert ev.component("fab_t").cost_like == ev.component("apgd_ce").key and ev.component("apgd_t").cost_like is None


def test_query_chunks_cover_the_queries_once():
    assert square.query_chunks(300, (3, 40)) == ((0, 3), (3, 9), (9, 21), (21, 45), (45, 85), (85, 125),
                                                 (125, 165), (165, 205), (205, 245), (245, 285), (285, 300))
    assert square.query_chunks(5000, (5000, 5000)) == ((0, 5000),)
    assert square.query_chunks(0) == ((0, 0),)  # the stripes alone
    with pytest.raises(ValueError, match="first <= longest"):
        square.query_chunks(10, (5, 2))


def test_aa_is_the_worst_case_and_independent_of_devices_and_batching():
    """2 devices, one batch of 356, Square in the default chunks vs 1 device, batches of 120, Square in
    chunks of 7 to 50 queries (compacted in between): the same per-example outcome for the cascade and for
    each component run alone; AA = clean AND every component, so it is below each of them.

    The batch shapes differ, so logits differ in rounding (tests/tolerances.py): the clean decisions are checked
    clear of it. The attacks' own comparisons (APGD's step-size checks, FAB's and Square's acceptances) happen
    inside their loops, where no test data can keep them clear of rounding: an outcome differing here means one
    of them flipped, and the failure message names the attack."""
    module, variables = robust_mlp()
    images, labels, x, *_ = digits_test_split()
    tolerances.assert_decisions_clear(module.apply(variables, jnp.asarray(x)), labels, "clean logits")
    components = autoattack.COMPONENTS
    attacks = ("clean", "aa") + components
    devices = jax.local_devices()
    assert len(devices) >= 2, "conftest forces 2 CPU devices"
    config = dataclasses.replace(SMALL, components=components)
    two = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=356, mesh=parallel.data_mesh(devices[:2]),
                              progress=False, aa_config=config).run(variables, attacks, seed=3).masks
    one = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=120, mesh=parallel.data_mesh(devices[:1]),
                              progress=False, aa_config=config, square_chunks=(7, 50)).run(variables, attacks,
                                                                                           seed=3).masks
    for name in attacks:
        assert two[name].shape == (len(labels),)
        np.testing.assert_array_equal(one[name], two[name], err_msg=name)
    worst = two["clean"].copy()
    for name in components:
        worst &= two[name]
        assert two["aa"].mean() <= two[name].mean()
    np.testing.assert_array_equal(two["aa"], worst)
    assert two["aa"].mean() < two["clean"].mean()


def test_trust_checks_flag_masked_gradients_and_pass_a_normal_model():
    module, variables = robust_mlp()
    images, labels, *_ = digits_test_split()
    assert our_report()["flags"] == []  # the adversarially trained model, standard settings, every attack
    masked = dataclasses.replace(module, mask_gradients=True)
    config = dataclasses.replace(SMALL, components=("apgd_ce", "square"))
    report = evaluate.evaluate_model(masked, variables, images, labels, ("clean", "fgsm", "aa"), eps=EPS,
                                     batch_size=356, aa_config=config, progress=False)
    checks = {f["check"] for f in report["flags"]}
    assert {"zero_gradients", "not_below_clean", "square_gain"} <= checks, report["flags"]
    assert report["gradients"]["zero"] == 1.0
    assert report["accuracy"]["fgsm"] == report["accuracy"]["clean"]  # sign(0) = 0: FGSM cannot move
    assert report["autoattack"]["accuracy_after"]["square"] < report["autoattack"]["accuracy_after"]["apgd_ce"]


def test_batch_shapes_bound_padding_and_compilations():
    """The evaluator's batch shapes: the batch size and n_devices * (2^k, 3 * 2^k) below it; a plan covers n
    points with less than 1.5x padded work in a fresh shape (2x when it reuses a compiled one), and reuses a
    compiled shape only when compiling costs more than the extra padded work (the measured costs)."""
    assert batch_plan.batch_shapes(200, 2) == (200, 192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 6, 4, 2)
    assert batch_plan.batch_shapes(200, 1)[-5:] == (6, 4, 3, 2, 1)
    assert batch_plan.batch_shapes(8, 8) == (8,)
    shapes = batch_plan.batch_shapes(200, 2)
    assert all(s % 2 == 0 for s in shapes)
    for n in range(1, 700):
        fresh = batch_plan.plan_batches(n, shapes)
        assert sum(fresh) >= n and sum(fresh) - fresh[-1] < n  # covers n; only the last batch is partial
        assert sum(fresh) <= 2 * n or n == 1  # (2 devices: at least one example each)
        assert n >= 200 or n < 3 or sum(fresh) < 1.5 * n  # a fresh shape pads less than 1.5x
        assert all(p in shapes for p in fresh)
        assert sum(batch_plan.plan_batches(n, shapes, compiled=shapes)) <= 2 * n or n == 1
    assert batch_plan.plan_batches(40, shapes) == (48,)
    assert batch_plan.plan_batches(33, shapes, compiled=(64,)) == (64,)  # reuse: 64 <= 2 * 33
    assert batch_plan.plan_batches(31, shapes, compiled=(64,)) == (32,)  # 64 > 62: a new, smaller shape
    assert batch_plan.plan_batches(450, shapes) == (200, 200, 200)  # the full shape again: 600 <= 900
    assert batch_plan.plan_batches(450, shapes, cost=(1.0, 10.0)) == (200, 200, 64)  # compiling 64 is cheaper
    # 85 points, 128 compiled, 96 would fit: reuse when compiling (10 s) costs more than 32 padded examples.
    assert batch_plan.plan_batches(85, shapes, compiled=(128,), cost=(0.1, 10.0)) == (128,)  # 3.2 s of padding
    assert batch_plan.plan_batches(85, shapes, compiled=(128,), cost=(1.0, 10.0)) == (96,)  # 32 s of padding


def test_cpu_plans_may_round_the_rest_up_to_a_shape_of_its_own():
    """With a granule, a timed plan may cover the rest with one batch of its count rounded up to a multiple of it:
    53 points in 56 rather than 48 + 6 (one compilation, not two) or 64; a tie goes to the single batch; never
    above the largest shape; and a compiled 56 is reused as the points left shrink."""
    shapes = batch_plan.batch_shapes(200, 1)
    capped = tuple(s for s in shapes if s <= 64)
    assert batch_plan.plan_batches(53, capped, cost=(1.0, 3.0), split=True) == (48, 6)
    assert batch_plan.plan_batches(53, capped, cost=(1.0, 3.0), split=True, granule=8) == (56,)
    assert batch_plan.plan_batches(53, capped, compiled=(48, 6), cost=(1.0, 0.0), split=True, granule=8) == (56,)
    assert batch_plan.plan_batches(49, capped, compiled=(56,), cost=(1.0, 3.0), split=True, granule=8) == (56,)
    assert batch_plan.plan_batches(61, (48, 32), cost=(1.0, 3.0), split=True, granule=8) == (48, 16)
    assert batch_plan.plan_batches(63, (64, 48), cost=(1.0, 3.0), split=True, granule=8) == (64,)
    assert batch_plan.plan_batches(53, capped, split=True, granule=8) == (64,)  # untimed: the shapes only
    for n in range(1, 300):
        plan = batch_plan.plan_batches(n, capped, cost=(1.0, 3.0), split=True, granule=8)
        assert sum(plan) >= n and max(plan) <= 64 and sum(plan) - n < 16, (n, plan)


def test_cpu_plans_split_the_rest_when_the_measured_costs_say_so():
    """split=True (CPUs): the rest may go in several batches of the shapes, each extra batch priced as
    BATCH_OVERHEAD_EXAMPLES examples, when that saves more padded work than its compilations cost."""
    one = batch_plan.batch_shapes(200, 1)
    extra = batch_plan.BATCH_OVERHEAD_EXAMPLES
    assert batch_plan.greedy_splits(81, one, one) == ((96,), (64, 24), (64, 16, 1), (64, 16, 1))
    assert batch_plan.greedy_splits(7, (8, 4, 2), (8, 4, 2)) == ((8,), (4, 4), (4, 2, 2))  # the 1 left pads to 2
    # Compiled pieces also close a prefix: 9 points after a compiled 4 in 4 + 4 + 4, no new shape.
    assert batch_plan.greedy_splits(9, (4, 48), one) == ((12,), (48,), (4, 6), (4, 48), (4, 4, 1), (4, 4, 4))
    # 153 points (the benchmark's first APGD-CE call) with 48 and 4 compiled, a compilation costing 6 examples' work:
    # 3 x 48 + 3 x 4 (3 padded, 2 extra batches) rather than a fourth 48 (39 padded) or a new 12 (3 padded + 6).
    capped = tuple(s for s in one if s <= 48)
    assert batch_plan.plan_batches(153, capped, compiled=(48, 4), cost=(1.0, 6.0), split=True) == (48, 48, 48, 4, 4, 4)
    assert batch_plan.plan_batches(153, capped, compiled=(48,), cost=(1.0, 6.0), split=True) == (48, 48, 48, 12)
    # Never past 2n, as a reused shape: 7 points after a compiled 32 go in a new 8, not the free 32 (25 padded).
    assert batch_plan.plan_batches(7, capped, compiled=(32,), cost=(1.0, 30.0), split=True) == (8,)
    # 104 points (the benchmark's APGD-T): 96 + 8 pads nothing, 128 pads 24 examples.
    assert batch_plan.plan_batches(104, one, cost=(1.0, 3.0)) == (128,)  # split=False: one batch, as on a GPU
    assert batch_plan.plan_batches(104, one, cost=(1.0, 3.0), split=True) == (96, 8)  # 104 + extra + 6 < 128 + 3
    assert batch_plan.plan_batches(104, one, compiled=(128,), cost=(0.1, 3.0), split=True) == (128,)  # 2.4 < 6.2
    assert batch_plan.plan_batches(104, one, compiled=(96, 8), cost=(0.1, 3.0), split=True) == (96, 8)  # compiled
    assert batch_plan.plan_batches(104, one, split=True) == (128,)  # no measured times: never split
    assert batch_plan.plan_batches(304, one, cost=(1.0, 0.0), split=True) == (200, 96, 8)  # after the full batches
    for n in range(1, 400):  # a split covers n, pads less than one closing shape, and prices no worse
        plan = batch_plan.plan_batches(n, one, cost=(1.0, 0.0), split=True)
        assert n <= sum(plan) and sum(plan) - plan[-1] < n and all(p in one for p in plan)
        rest = plan[n // 200:]  # the cover after the full batches, priced with its extra batches
        assert sum(rest) + extra * (len(rest) - 1) <= sum(batch_plan.plan_batches(n, one, cost=(1.0, 0.0))[n // 200:])


def test_evaluator_counts_every_example_once_in_any_order():
    """map_points returns per-example outputs in the order of the indices asked for, whatever batches it uses."""
    module, variables = robust_mlp()
    images, labels, x, *_ = digits_test_split()
    ev = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=100, progress=False)
    logits = module.apply(variables, jnp.asarray(x))  # one batch of 356, the evaluator's are of 100
    tolerances.assert_decisions_clear(logits, labels, "clean logits")
    want = np.asarray(jnp.argmax(logits, -1)) == labels
    np.testing.assert_array_equal(ev.correct(variables, "clean"), want)
    order = np.random.default_rng(0).permutation(len(labels))[:77]
    np.testing.assert_array_equal(ev.map_points(ev.white_box("clean"), variables, order, jax.random.key(0)),
                                  want[order])


def test_cascade_progress_shows_points_still_robust_and_runs_left(capsys):
    """Each component's bar names the examples still robust and the runs left, and every run sees only those."""
    seen = []

    def run_points(name, run, indices, report):
        seen.append((name, run, indices.tolist()))
        report(1, "chunk 1")
        return np.arange(indices.size) == 0  # each run fools the first example still robust

    clean = np.array([True, True, False, True, True, True])
    bars = evaluator.CascadeBars()  # the evaluator's display; the cascade itself only reports
    result = autoattack.cascade(run_points, clean, num_classes=10, components=("apgd_t",), report=bars)
    assert [s[2] for s in seen[:3]] == [[0, 1, 3, 4, 5], [1, 3, 4, 5], [3, 4, 5]] and len(seen) == 5
    assert result.robust.tolist() == [False] * 6 and result.fooled_by.tolist() == [1, 1, -2, 1, 1, 1]
    err = capsys.readouterr().err
    assert "aa APGD-T" in err and "robust=5/6" in err and "runs_left=9" in err and "robust=2/6" in err


def test_forward_working_set_counts_the_activations_live_at_once():
    """forward_peak_bytes: an activation stays live until its last reader, also when read through a fused
    elementwise op (the shortcut `relu(a)`); activation_bytes counts every activation (a backward keeps them)."""
    ws = {k: jnp.ones(shape) for k, shape in {"w1": (8, 16), "w2": (16, 32), "w3": (32, 4), "w4": (16, 4)}.items()}

    def net(v, x):
        a = x @ v["w1"]                           # 16 floats
        c = (a @ v["w2"]) @ v["w3"]               # 32, then 4: a, its product and c live at once (16 + 32 + 4)
        return c + jnp.maximum(a, 0.0) @ v["w4"]  # 4

    def chain(v, x):
        return ((x @ v["w1"]) @ v["w2"]) @ v["w3"]  # at most two live at once: 16 + 32

    assert batch_plan.forward_peak_bytes(net, ws, (8,)) == 4 * (16 + 32 + 4)
    assert batch_plan.forward_peak_bytes(chain, ws, (8,)) == 4 * (16 + 32)
    assert batch_plan.activation_bytes(net, ws, (8,)) == 4 * (16 + 32 + 4 + 4)


def test_measured_cap_moves_to_the_fastest_neighbouring_shape():
    """measured_cap walks from the cache model's cap towards the shape that costs least per example, larger
    shapes first, timing each shape once; differences within the margin (timing noise) keep the start."""
    shapes = batch_plan.batch_shapes(200, 1)  # ..., 32, 48, 64, 96, 128, 192, 200

    def curve(best):
        timed = []

        def per_example(size):
            timed.append(size)
            return 1.0 + abs(np.log2(size / best))  # V-shaped around `best`

        return per_example, timed

    per_example, timed = curve(96)
    assert batch_plan.measured_cap(per_example, shapes, 48) == 96 and timed == [48, 64, 96, 128]
    per_example, timed = curve(32)
    assert batch_plan.measured_cap(per_example, shapes, 128) == 32 and timed == [128, 192, 96, 64, 48, 32, 24]
    timed = []
    flat = batch_plan.measured_cap(lambda size: timed.append(size) or 1.0 - 0.01 * (size > 48), shapes, 48)
    assert flat == 48 and timed == [48, 64, 32]  # 1% better: within the margin
    x = jnp.ones((4, 3))
    assert 0 < batch_plan.seconds_per_example(jax.jit(lambda a: a * 2), x) < 1.0


def test_cpu_batches_fit_the_last_level_cache(tmp_path, monkeypatch):
    """On a CPU the evaluator runs only the shapes whose working set fits the last-level cache (read from sysfs;
    activations from the module's own outputs: all of them for gradient programs, the forward's live peak for
    Square); the outcomes are those of the uncapped evaluator (batches of 32 and 48 against 120: the clean
    decisions are clear of rounding, the attacks' as in the device test above)."""
    for index, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "32768K")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(f"{level}\n")
        (tmp_path / f"index{index}" / "size").write_text(f"{size}\n")
    assert batch_plan.cache_bytes(str(tmp_path)) == 32 * 2 ** 20
    assert batch_plan.cache_bytes(str(tmp_path / "none")) is None
    shapes = batch_plan.batch_shapes(200, 1)
    assert batch_plan.cache_cap(shapes, 639272, 32 * 2 ** 20) == 48  # the benchmark's WRN-10-1: 0.64 MB each
    assert batch_plan.cache_cap(shapes, 10, None) == 200 and batch_plan.cache_cap(shapes, 2 ** 30, 2 ** 20) == 1

    module, variables = robust_mlp()
    images, labels, *_ = digits_test_split()
    per_example = batch_plan.activation_bytes(evaluator.as_apply_fn(module), variables, images.shape[1:])
    assert per_example == 4 * (module.hidden + module.hidden + 10)  # fc1's product, its ReLU, fc2's product
    forward = batch_plan.forward_peak_bytes(evaluator.as_apply_fn(module), variables, images.shape[1:])
    assert forward == 4 * 2 * module.hidden  # at the ReLU: fc1's product (its input) and its output
    monkeypatch.setattr(batch_plan, "cache_bytes", lambda: 48 * forward)  # 48 forward-only examples, 44 backward
    config = dataclasses.replace(SMALL, components=("apgd_ce", "square"))
    capped = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=120, progress=False, aa_config=config)
    plain = evaluator.Evaluator(module, images, labels, eps=EPS, batch_size=120, progress=False, aa_config=config)
    plain.split_batches = False  # as on an accelerator: full batches of 120, the rest in one padded batch
    assert capped.plan_shapes(variables)[0] == 32 and plain.plan_shapes(variables) == plain.shapes
    assert capped.plan_shapes(variables, forward_only=True)[0] == 48
    ours = capped.run(variables, ("clean", "aa"), seed=1).masks
    theirs = plain.run(variables, ("clean", "aa"), seed=1).masks
    for name in ("clean", "aa"):
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert max(max(s) for k, s in capped._compiled.items() if k != ("aa", "square")) == 32
    assert max(capped._compiled["aa", "square"]) == 48 < max(max(s) for s in plain._compiled.values())


def test_benchmark_batch_curve_times_each_shape_per_example():
    """scripts/benchmark_autoattack.py --batch_curve (aa_bench.batch_curve): a row per batch shape, APGD-T and FAB-T
    times per example."""
    module = TinyMLP()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    labels = np.asarray(jnp.argmax(module.apply(variables, images / 255.0), -1))  # every image correct
    rows = aa_bench.batch_curve(module, variables, images, labels, [2], eps=EPS, n_iter=2, rounds=1)
    assert [r["batch"] for r in rows] == [2]
    assert all(r["apgd_t"] > 0 and r["fab_t"] > 0 for r in rows)


def test_benchmark_reuses_a_finished_training_workdir(tmp_path):
    """scripts/benchmark_autoattack.py's model: a workdir that holds a finished run (summary.json) is loaded from
    its best checkpoint, not trained again."""
    from mmard_jax import checkpoints, files
    from mmard_jax.models import store

    spec = store.model_spec("wide_resnet", 10, {"depth": 10, "width": 1})
    module = store.build_module(spec)
    shapes = store.abstract_variables(module, (32, 32, 3))
    variables = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
    files.write_json_atomic(tmp_path / store.SPEC_FILE, spec)
    saved = checkpoints.TrainCheckpoints(tmp_path, "pgd_t")
    saved.save_best(3, variables, 0.4)
    saved.close()
    files.write_json_atomic(tmp_path / "summary.json", {})
    files.write_json_atomic(tmp_path / "config.json", aa_bench.train_config(tmp_path / "data").to_dict())
    loaded_module, loaded = aa_bench.trained_wrn(tmp_path, progress=False)
    assert loaded_module.num_classes == 10
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("field, value", [("attack.eps", 8 / 255), ("num_epochs", 6), ("optim.lr", 0.1)])
def test_benchmark_refuses_a_workdir_of_another_recipe(tmp_path, field, value):
    """A finished workdir whose config.json trained another recipe (the cached model of an older aa_bench.TRAIN)
    is refused with a one-line error naming the file and field, not benchmarked; a missing config.json too."""
    from mmard_jax import files

    files.write_json_atomic(tmp_path / "summary.json", {})
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        aa_bench.trained_wrn(tmp_path, progress=False)
    config = aa_bench.train_config(tmp_path / "data")
    files.write_json_atomic(tmp_path / "config.json", config.to_dict())
    aa_bench.check_recipe(tmp_path)  # the recipe itself passes
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    files.write_json_atomic(tmp_path / "config.json", config.to_dict())
    with pytest.raises(ValueError, match=rf"config\.json: {field} is {value!r} where .* trains "):
        aa_bench.trained_wrn(tmp_path, progress=False)
