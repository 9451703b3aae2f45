"""Adversarial attacks: the projected-gradient engine (training and evaluation share it)."""

from mmard_jax.attacks.engine import INITS, initial_point, pgd, project

__all__ = ["INITS", "initial_point", "pgd", "project"]
