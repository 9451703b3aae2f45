"""Where a student's train-step time goes, per kind of work and per layer type, JAX vs PyTorch eager, on this device.

    python scripts/profile_ops.py --arch=mobilenet_v2 --batch=128 --size=16 --output=profile.md
    python scripts/profile_ops.py --arch=wide_resnet --arch_kwargs=depth=10,width=1 --channels=32

The MMARD step is 10 PGD steps (teacher and student: forward + input gradient, inference-mode BN) plus a
train-mode forward and backward of the student. This script times those pieces of the student alone, whole
network (forward; forward + input gradient; train-mode forward + parameter gradient; `--arch_kwargs` for the
architecture's arguments), and the layer types of the zoo's students (1x1 and 3x3 depthwise convolution at
MobileNetV2's largest shape, a plain 3x3 convolution of `--channels`, the 3x3 RGB stem: forward, input gradient,
kernel gradient), for JAX (each `depthwise` implementation) and PyTorch eager, same shapes, float32.
Medians of `--repeat` timed calls after one warm-up call; XLA compilation excluded. Writes a Markdown table.
The pieces and the table are `mmard_jax.tools.profile_ops`, their PyTorch side tests/peers/torch_profile.py.
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # mmard_jax, and the PyTorch peers (`peers`)

from mmard_jax import xla_env  # noqa: E402 - the entry point's CPU XLA defaults, before JAX starts

xla_env.apply_cpu_defaults()

from mmard_jax.tools import profile_ops  # noqa: E402
from peers import torch_profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--arch_kwargs", default="", help="the architecture's integer arguments, e.g. depth=10,width=1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=192, help="layer-type rows: channels of the depthwise layer")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--output", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()
    kwargs = profile_ops.parse_kwargs(args.arch_kwargs)
    rows = profile_ops.profile(args.arch, args.batch, args.size, args.channels, args.repeat,
                               torch_profile.torch_network, torch_profile.torch_layer_pieces, kwargs)
    table = profile_ops.table(rows, args.arch, args.batch, args.size, args.channels, torch_profile.torch_threads(),
                              kwargs)
    print(table)
    if args.output:
        with open(args.output, "a") as f:
            f.write(table)


if __name__ == "__main__":
    main()
