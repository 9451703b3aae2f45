"""mmard_jax: Adversarial Robustness Distillation (MMARD and its baselines) in JAX/Flax."""

from mmard_jax import xla_env

__version__ = "0.1.0"

xla_env.apply_cpu_defaults()
