"""Adversarial attacks: the projected-gradient engine (training and evaluation share it), APGD, FAB-T,
Square and the AutoAttack cascade (evaluation), and the split-level runner in `suite`."""

from mmard_jax.attacks.engine import INITS, NORMS, initial_point, pgd, project

__all__ = ["INITS", "NORMS", "initial_point", "pgd", "project"]
