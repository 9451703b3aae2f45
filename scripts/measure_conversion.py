"""Time and peak memory of converting the paper's teachers (random weights saved by PyTorch first).

    python scripts/measure_conversion.py                      # WRN-34-10 and WRN-70-16
    python scripts/measure_conversion.py --models=wrn34_10 --keep=/tmp/teachers

Each step runs in its own process, measured with `os.wait4` (wall time, CPU time, peak RSS of that process):
1. PyTorch builds the RobustBench module (random weights) and `torch.save`s its state_dict;
2. `python -m mmard_jax.convert --robustbench=NAME ...` (the CLI a user runs);
3. `mmard_jax.models.load_pretrained` of the result (what training does at start-up).
Needs torch and robustbench (installed with --no-deps; only its architecture files are loaded).
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"  # the PyTorch peers (`peers`)

# name -> (RobustBench name, dataset, architecture file, constructor expression over that module)
MODELS = {
    "wrn34_10": ("Zhang2019Theoretically", "cifar10", "wide_resnet",
                 "m.WideResNet(depth=34, widen_factor=10, sub_block1=True)"),
    "wrn70_16": ("Gowal2020Uncovering", "cifar100", "dm_wide_resnet",
                 "m.DMWideResNet(num_classes=100, depth=70, width=16, activation_fn=m.Swish, "
                 "mean=m.CIFAR100_MEAN, std=m.CIFAR100_STD)"),
}

_SAVE = """
import sys, torch
sys.path.insert(0, {tests!r})
from peers.robustbench import load_arch
m = load_arch({arch_file!r})
torch.manual_seed(0)
model = {constructor}
print(sum(p.numel() for p in model.parameters()))
torch.save(model.state_dict(), {dst!r})
"""

_LOAD = """
from mmard_jax import models
module, variables = models.load_pretrained({src!r})
print(models.count_params(variables))
"""


def measured(command, env=None):
    """Runs `command`; (stdout, wall s, CPU s, peak RSS MiB) of that one process, via os.wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{command} failed ({proc.returncode}):\n{out}")
    return out, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def measure(name: str, workdir: pathlib.Path) -> dict:
    """The three steps for one model; returns their numbers."""
    robustbench, dataset, arch_file, constructor = MODELS[name]
    src, dst = workdir / f"{robustbench}.pt", workdir / f"{robustbench}_{dataset}"
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    script = _SAVE.format(tests=str(TESTS), arch_file=arch_file, constructor=constructor, dst=str(src))
    out, save_wall, _, save_rss = measured([sys.executable, "-c", script], env)
    params = int(out.split()[-1])
    print(f"[{name}] PyTorch built and saved {params / 1e6:.1f}M parameters ({src.stat().st_size / 2**20:.0f} MiB) "
          f"in {save_wall:.1f} s", flush=True)
    out, wall, cpu, rss = measured([sys.executable, "-m", "mmard_jax.convert", f"--robustbench={robustbench}",
                                    f"--dataset={dataset}", f"--src={src}", f"--dst={dst}", "--overwrite"], env)
    print(out.rstrip(), flush=True)
    inner = float(re.search(r"done in ([0-9.]+) s", out).group(1))  # convert_file alone, without start-up
    load_out, load_wall, _, load_rss = measured([sys.executable, "-c", _LOAD.format(src=str(dst))], env)
    converted = int(load_out.split()[-1])  # less than `params` when the file has unused keys (sub_block1)
    return {
        "model": name, "robustbench": robustbench, "dataset": dataset, "params_M": round(converted / 1e6, 1),
        "torch_params_M": round(params / 1e6, 1),
        "file_MiB": round(src.stat().st_size / 2**20), "convert_wall_s": round(wall, 1), "convert_file_s": inner,
        "convert_cpu_s": round(cpu, 1),
        "convert_peak_rss_MiB": round(rss), "load_wall_s": round(load_wall, 1), "load_peak_rss_MiB": round(load_rss),
        "torch_save_peak_rss_MiB": round(save_rss),
    }


def markdown(rows) -> str:
    """The results as a Markdown table."""
    lines = ["| model | params | file | convert wall (of which convert_file) | convert CPU | convert peak RSS "
             "| load_pretrained wall | load peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['robustbench']} ({r['dataset']}, {r['model']}) | {r['params_M']}M | {r['file_MiB']} MiB "
                     f"| {r['convert_wall_s']} s ({r['convert_file_s']} s) | {r['convert_cpu_s']} s "
                     f"| {r['convert_peak_rss_MiB']} MiB | {r['load_wall_s']} s | {r['load_peak_rss_MiB']} MiB |")
    return "\n".join(lines)


flags.DEFINE_list("models", ["wrn34_10", "wrn70_16"], f"Comma-separated, from {sorted(MODELS)}.")
flags.DEFINE_string("keep", None, "Directory for the files (kept); default: a temporary one.")
flags.DEFINE_string("json", None, "Also write the numbers here.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    unknown = sorted(set(FLAGS.models) - set(MODELS))
    if unknown:
        raise app.UsageError(f"unknown models {unknown}; known: {sorted(MODELS)}")
    with tempfile.TemporaryDirectory(prefix="measure_conversion_") as tmp:
        workdir = pathlib.Path(FLAGS.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = [measure(n, workdir) for n in FLAGS.models]
    print(markdown(rows))
    if FLAGS.json:
        pathlib.Path(FLAGS.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
