"""The PyTorch rows of scripts/benchmark.py: `peers.torch_step` timed on a case of `mmard_jax.tools.bench_cases`,
from the JAX row's weights and first draws (its start file), on the same batches."""

import os
import platform
import statistics
import time
from typing import Any, Dict, Optional

import torch

from mmard_jax import methods
from mmard_jax.tools.bench_cases import EPOCH, Case, bench_data, transcription
from mmard_jax.tools.bench_step import load_start, peak_rss_bytes, summarize
from peers import torch_step
from peers.architectures import build_model
from peers.interop import copy_into_torch


def default_torch_forms() -> str:
    """Eager float32 and the fastest form: on CUDA bf16 autocast + channels_last + compile; on the CPU
    channels_last + compile in float32 (this CPU has no bf16 arithmetic: BENCHMARKS.md measures the others)."""
    return "eager,cl+compile+bf16" if torch.cuda.is_available() else "eager,cl+compile"


def torch_worker(case: Case, warmup: int, steps: int, form_text: str, seed: int = 0,
                 start_file: Optional[str] = None) -> Dict[str, Any]:
    """Times `peers.torch_step`'s step for `case` in the given form, on the device: from the JAX worker's
    weights and first draws (`start_file`, when it exists), on the same batches."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    form = torch_step.parse_form(form_text)
    if device.type == "cuda" and form.name != "eager":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    used = methods.get_method(case.method, plugins=case.plugins).networks()
    teacher = (case.teacher, case.teacher_kwargs)  # every teacher role: CIARD's robust and clean teachers too
    arch = {"student": (case.student, case.student_kwargs), "peer": (case.student, case.student_kwargs),
            "teacher": teacher, "rteacher": teacher, "teacher2": teacher}
    nets = {name: build_model(arch[name][0], case.num_classes, arch[name][1]) for name in arch if name in used}
    draws, weights = {}, "own (random)"
    if start_file and os.path.exists(start_file):
        variables, draws = load_start(start_file)
        nets = {name: copy_into_torch(variables[name], net) for name, net in nets.items()}
        weights = "the JAX row's"
    nets = {name: net.to(device) for name, net in nets.items()}
    # Our semantics where the published scripts differ in value only: the start projected (the random images hold
    # 0 and 255) and the exact KL (RSLAD's/MTARD's 1e-5); see peers.torch_step's docstring.
    settings = torch_step.Settings(method=transcription(case), steps=case.pgd_steps, kl_form="exact",
                                   project_start=True)
    step = torch_step.make_step(settings, nets, form, seed=seed)
    total = warmup + steps
    images_np, labels_np, idx_np = bench_data(case, total, seed)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.from_numpy(labels_np).long().to(device)
    idx = torch.from_numpy(idx_np).long().to(device)
    first = {}
    if draws:
        noise = draws.get("noise")
        first = {"offsets": torch.from_numpy(draws["offsets"]).long().to(device),
                 "flips": torch.from_numpy(draws["flips"]).to(device),
                 "noise": (None if noise is None
                           else torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(device))}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    metrics = step(images, labels, idx[0], epoch=EPOCH, **first)
    first_loss = float(metrics["loss"])
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        metrics = step(images, labels, idx[i], epoch=EPOCH)
    sync()
    times = []
    start = time.perf_counter()
    for i in range(warmup, total):
        t = time.perf_counter()
        metrics = step(images, labels, idx[i], epoch=EPOCH)
        sync()
        times.append(time.perf_counter() - t)
    total_s = time.perf_counter() - start
    out = {
        "impl": "torch", "form": form.name, "backend": device.type,
        "device_kind": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "n_devices": 1, "versions": torch_step.torch_versions(), "threads": torch.get_num_threads(),
        # torch.compile compiles lazily: the first step's excess over a steady step is its compile time.
        "compile_s": first_s - statistics.median(times), "loss": float(metrics["loss"]),
        "first_loss": first_loss, "weights": weights,
        "dtype": "bfloat16" if form.bf16 else "float64" if form.f64 else "float32",
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes(),
        "mem_kind": "device peak" if device.type == "cuda" else "process peak RSS",
    }
    out.update(summarize(times, case.batch, total_s, steps))
    return out
