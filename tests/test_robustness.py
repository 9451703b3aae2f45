"""`mmard_jax.robustness` on models outside our zoo: a plain Flax module without a `train` keyword and a pure-JAX
function of a parameter dict (the same weights, so the same outcomes), uint8 and float inputs, both norms, the
report's numbers against the masks (NumPy), AutoAttack's adversarial examples (feasible, and misclassified exactly
where the report says), and the README's "Attacking your own model" examples run as written."""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax import cli, robustness
from mmard_jax.attacks import autoattack
from test_attacks_peer import digits_test_split, robust_mlp

# AutoAttack's budget cut for the mechanics tested here (test_autoattack_original*.py run the standard settings).
SMALL = dict(n_iter=10, n_target_classes=3, square_queries=200)
N = 96  # examples: 2 devices x 48


class PlainMLP(nn.Module):
    """A Flax module as a user writes it: no `train` keyword, no num_classes attribute."""

    @nn.compact
    def __call__(self, x):
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
        return nn.Dense(10, name="fc2")(nn.relu(nn.Dense(64, name="fc1")(x)))


def pure_apply(params, x):
    """The same network as a pure function of a parameter dict."""
    h = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1) @ params["w1"] + params["b1"]
    return jax.nn.relu(h) @ params["w2"] + params["b2"]


@pytest.fixture(scope="module")
def model():
    """The adversarially trained MLP of test_attacks_peer.py, its weights in both forms, and N digits."""
    _, variables = robust_mlp()
    p = variables["params"]
    params = {"w1": p["fc1"]["kernel"], "b1": p["fc1"]["bias"], "w2": p["fc2"]["kernel"], "b2": p["fc2"]["bias"]}
    images, labels, x, *_ = digits_test_split()
    return variables, params, images[:N], labels[:N], x[:N]


def small(norm):
    return dataclasses.replace(autoattack.STANDARD, norm=norm, **SMALL)


def check_report(report, labels, attacks):
    """Accuracies, counts, per-class numbers and JSON are what the masks say (written from the masks in NumPy)."""
    assert set(report.masks) == set(attacks) and set(report.accuracy) == set(attacks)
    for name in attacks:
        mask = report.masks[name]
        assert mask.shape == labels.shape and mask.dtype == bool
        assert report.accuracy[name] == pytest.approx(mask.mean())
        per = report.per_class[name]
        acc = [mask[labels == c].mean() if (labels == c).any() else None for c in range(10)]
        assert per["accuracy"] == pytest.approx(acc)
        seen = np.array([a for a in acc if a is not None])
        assert per["worst"] == pytest.approx(seen.min()) and acc[per["worst_class"]] == pytest.approx(seen.min())
        assert per["nsd"] == pytest.approx(seen.std() / seen.mean())
    body = json.loads(report.to_json())
    assert body["accuracy"] == pytest.approx(report.accuracy) and body["norm"] == report.norm
    assert body["counts"] == {k: int(v.sum()) for k, v in report.masks.items()}


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_a_plain_module_and_a_pure_function_give_the_same_report(model, norm):
    variables, params, images, labels, x = model
    attacks = ("clean", "fgsm", "pgd_s", "aa")
    module_report = robustness.evaluate(PlainMLP().apply, variables, images, labels, attacks=attacks, norm=norm,
                                        batch_size=48, progress=False, aa_config=small(norm))
    function_report = robustness.evaluate(jax.jit(pure_apply), params, x, labels, attacks=attacks, norm=norm,
                                          batch_size=48, progress=False, aa_config=small(norm))
    check_report(module_report, labels, attacks)
    check_report(function_report, labels, attacks)
    assert module_report.eps == robustness.DEFAULT_EPS[norm] and module_report.norm == norm
    for name in attacks:  # the same weights, uint8 images scaled exactly as the float ones
        np.testing.assert_array_equal(module_report.masks[name], function_report.masks[name], err_msg=name)
    clean = np.asarray(jnp.argmax(pure_apply(params, jnp.asarray(x)), -1)) == labels
    np.testing.assert_array_equal(module_report.masks["clean"], clean)
    acc = module_report.accuracy
    assert acc["aa"] <= min(acc["fgsm"], acc["pgd_s"]) and acc["pgd_s"] < acc["clean"]
    aa = module_report.autoattack
    assert aa["version"] == "custom (" + ", ".join(f"{k}={v!r}" for k, v in SMALL.items()) + ")"
    assert aa["settings"]["norm"] == norm and aa["accuracy_after"]["aa"] == pytest.approx(acc["aa"])
    assert module_report.flags == [] and module_report.gradients == {"zero": 0.0, "nonfinite": 0.0}


@pytest.mark.parametrize("norm,eps", [("Linf", 16 / 255), ("L2", 1.0)])
def test_autoattack_returns_feasible_worst_case_examples(model, norm, eps, monkeypatch):
    """x_adv is x where no component fooled the example, inside the eps-ball and [0, 1] everywhere, and the
    model is right on x_adv exactly where the report's AA mask says so."""
    _, params, _, labels, x = model
    monkeypatch.setattr(robustness, "standard_config", lambda version, n: small(n))
    x_adv, report = robustness.autoattack(pure_apply, params, x, labels, norm=norm, eps=eps, batch_size=48,
                                          progress=False)
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    diff = (x_adv - x).reshape(len(x), -1)
    dist = np.abs(diff).max(1) if norm == "Linf" else np.sqrt((diff.astype(np.float64) ** 2).sum(1))
    assert dist.max() <= eps + (autoattack.FEASIBILITY_SLACK if norm == "Linf" else 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    correct_adv = np.asarray(jnp.argmax(pure_apply(params, jnp.asarray(x_adv)), -1)) == labels
    np.testing.assert_array_equal(correct_adv, report.masks["aa"])
    untouched = report.masks["aa"] | ~report.masks["clean"]
    np.testing.assert_array_equal(x_adv[untouched], x[untouched])
    assert 0 < report.accuracy["aa"] < report.accuracy["clean"]
    assert sum(report.autoattack["fooled_by"].values()) == int((report.masks["clean"] & ~report.masks["aa"]).sum())


def test_user_errors_are_one_line():
    f = lambda p, x: x.reshape(x.shape[0], -1)[:, :10]  # noqa: E731
    images, labels = np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(cli.UserError, match="norm must be one of Linf, L2, got 'L1'"):
        robustness.evaluate(f, {}, images, labels, norm="L1")
    with pytest.raises(cli.UserError, match="version 'plus' is not available"):
        robustness.autoattack(f, {}, images, labels, version="plus")
    with pytest.raises(cli.UserError, match="unknown attack"):
        robustness.evaluate(f, {}, images, labels, attacks=("clean", "pgd_l2"))
    with pytest.raises(cli.UserError, match="eps must be > 0"):
        robustness.evaluate(f, {}, images, labels, eps=0.0)


def test_readme_examples_run(model, monkeypatch):
    """The README's "Attacking your own model" code, run as written on this file's MLP and digits (AutoAttack's
    budget cut through `standard_config`, the calls unchanged)."""
    _, params, _, labels, x = model
    monkeypatch.setattr(robustness, "standard_config", lambda version, n: small(n))
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Attacking your own model"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) >= 2
    namespace = {"params": params, "images": x, "labels": labels}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["report"], robustness.RobustnessReport)
    assert namespace["x_adv"].shape == x.shape
