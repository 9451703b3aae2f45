"""The Python parts of scripts/gpu_check.sh: the correctness smoke test (part a) and the summary of every part.

    python scripts/gpu_check.py smoke WORK/a_smoke.json      # part (a), on the default backend
    python scripts/gpu_check.py summary WORK OUT_DIR         # summary.md, results.json, logs.txt in OUT_DIR

The smoke test (a tiny train step and evaluation, accelerator vs CPU) and the summary are
`mmard_jax.tools.gpu_check` (its docstring). `smoke` prints its checks and exits with status 1 if any fails;
`summary` prints the status of every part.
"""

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmard_jax.tools import gpu_check  # noqa: E402 - no JAX yet: the smoke test sets XLA's flags first


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smoke")
    s.add_argument("out")
    m = sub.add_parser("summary")
    m.add_argument("work")
    m.add_argument("out_dir")
    args = p.parse_args(argv)
    if args.cmd == "smoke":
        from mmard_jax import runtime, xla_env

        xla_env.apply_cpu_defaults()
        # $MMARD_XLA_CACHE, else ~/.cache/mmard_jax/xla: the CPU half loads the programs its devices share with the
        # accelerator half (the initialisations, on the first device in both), and a rerun loads them all.
        runtime.enable_compilation_cache()
        result = gpu_check.smoke(args.out)
        print(json.dumps({"ok": result["ok"], "checks": result["checks"]}))
        return 0 if result["ok"] else 1
    print(gpu_check.summary(args.work, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
