"""PyTorch peers and test oracles: what our JAX code is checked against (tests/) and timed against (scripts/).

Imported as `peers` (tests/ is on sys.path: pytest puts the conftest's folder there, scripts insert it). Only
tests and scripts import this package; mmard_jax never does (tests/test_architecture.py).

  packages.py       peer packages of requirements-nodeps.txt: a missing one is an error, never a skip
  robustbench.py    the one loader of RobustBench's architecture files (no `import robustbench`)
  mobilenetv2.py    the kuangliu/RSLAD CIFAR MobileNetV2 in PyTorch
  interop.py        Flax variables into a PyTorch module; seeded BatchNorm statistics
  architectures.py  the PyTorch peer of `mmard_jax.models.create` (global mean pool at any input size)
  published_models.py  the 64x64/SVHN architectures of DM-Improves-AT, SAAD, DGAD and PeerAiD, as published
  published_losses.py  the published scripts' losses, as each writes them
  published_steps.py   hyper-parameters, attack starts and one step per method, as each script runs it
  torch_step.py     `TorchTrainStep`: one training step of any method as its published script runs it
  torch_bench.py    the PyTorch rows of scripts/benchmark.py
  torch_profile.py  the PyTorch side of scripts/profile_ops.py
  original_aa.py    the original AutoAttack (pyautoattack) timed per component, for scripts/benchmark_autoattack.py
"""
