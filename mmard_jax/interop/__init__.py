"""PyTorch interop: RobustBench/PyTorch checkpoints in (`convert`), PyTorch state_dicts out (`export`), the
RobustBench models whose architecture is ours (`zoo`), teachers published elsewhere by file name (`published`),
the Flax <-> PyTorch naming rule (`naming`), and the helpers that copy weights into PyTorch peers for tests and
benchmarks (`testing`). Only `convert`/`export` at run time and `testing` import torch, and only inside
functions."""
