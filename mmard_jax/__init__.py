"""mmard_jax: Adversarial Robustness Distillation (MMARD and its baselines) in JAX/Flax."""

__version__ = "0.1.0"
