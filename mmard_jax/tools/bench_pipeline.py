"""`scripts/benchmark.py --pipeline`: the streamed input pipeline's images/s on this CPU against what a train step
consumes, and the resident and streamed trainers side by side on one CIFAR-sized case.

Three parts, one run:
1. Loader: grain reading, decoding, augmenting and batching (`data.stream.make_dataset`, the trainer's own
   pipeline) per worker-process count, on ImageNet-shaped JPEGs the script writes (`photo`: smooth random content
   at 500x375, ImageNet's most common size, quality 90) with the random-resized crop to 224, and on 32x32 PNGs with
   the pad-crop (CIFAR-sized).
2. Trainer: `train.train_and_evaluate` on the same small case (RSLAD, WRN-10-1 <- WRN-16-2, digits at 16x16, batch
   128) with the split resident, streamed from memory, and streamed from a PNG folder (decoded per step); the
   steady step time is the median of the middle epochs' seconds per step (the first compiles, the last evaluates).
3. Demand: the images/s an ImageNet ResNet-50 distillation step would take from the loader on a GPU: XLA's cost
   analysis of the step (`bench_step.step_flops`, abstract, no compilation) at an assumed share of the GPU's peak,
   divided by the loader's measured rate per CPU core = the CPU cores per GPU that keep it fed.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Sequence

import numpy as np

IMAGENET_SHAPE = (375, 500)  # height, width: ImageNet's most common training-image size
H100_BF16_TFLOPS = 989.0  # dense bf16 peak, H100 SXM (bench_report.PEAKS)
ASSUMED_MFU = (0.3, 0.5)  # shares of that peak a well-fed step might reach: the demand's low and high estimates


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 HWC image that compresses like a photograph: 16x16 random colours upsampled, plus fine noise."""
    import PIL.Image

    coarse = PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), PIL.Image.Resampling.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


def write_folder(root: pathlib.Path, images: Sequence[np.ndarray], labels: Sequence[int], suffix: str) -> pathlib.Path:
    """root/<label>/<i><suffix> for each image (Pillow; JPEG at quality 90): an image-folder source's layout."""
    import PIL.Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(image).save(folder / f"{i:06d}{suffix}", quality=90)
    return root


def loader_rate(source, augment, *, batch: int, batches: int, workers: int) -> Dict[str, float]:
    """Images/s of the trainer's stream over `source` in steady state: after the first batch (worker start-up) and
    the batches grain's buffers filled meanwhile, `batches` timed; also the first batch's seconds."""
    from mmard_jax.data import stream

    settings = stream.StreamSettings(workers=workers)
    # Batches grain may hold ready when the first arrives: each reading process's read-ahead (ReadOptions prefetches
    # up to `read_threads` batched elements) and each worker's output buffer; drained untimed.
    buffered = 2 + max(workers, 1) * settings.read_threads + workers * settings.prefetch
    per_epoch = len(source) // batch
    dataset = stream.make_dataset(source, augment, seed=0, n=len(source), global_batch=batch, rows=slice(0, batch),
                                  num_epochs=(buffered + batches) // per_epoch + 2, settings=settings)
    feed = stream.Stream(dataset, per_epoch)
    try:
        start = time.perf_counter()
        feed.next()
        first = time.perf_counter() - start
        for _ in range(buffered):
            feed.next()
        start = time.perf_counter()
        for _ in range(batches):
            images, _ = feed.next()
        seconds = time.perf_counter() - start
    finally:
        feed.close()
    return {"images_per_s": batches * batch / seconds, "first_batch_s": first, "shape": list(images.shape)}


def loader_rows(root: pathlib.Path, worker_counts: Sequence[int], imagenet_images: int, batches: int,
                say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Part 1: the loader's rate per worker count on ImageNet-shaped JPEGs (random-resized crop 224) and on 32x32
    PNGs (pad-crop 4 + flip)."""
    from mmard_jax.data import host_augment, sources

    rng = np.random.default_rng(0)
    jpegs = write_folder(root / "imagenet", [photo(rng, *IMAGENET_SHAPE) for _ in range(imagenet_images)],
                         np.arange(imagenet_images) % 10, ".JPEG")
    pngs = write_folder(root / "small", [photo(rng, 32, 32) for _ in range(1024)], np.arange(1024) % 10, ".png")
    kinds = [("ImageNet-shaped JPEG 500x375, random-resized crop 224 + flip", sources.image_folder(jpegs),
              host_augment.Augment("random_resized_crop", size=224), 32),
             ("32x32 PNG, pad-crop 4 + flip", sources.image_folder(pngs), host_augment.Augment("pad_crop"), 128)]
    rows = []
    for name, source, augment, batch in kinds:
        for workers in worker_counts:
            row = {"part": "loader", "input": name, "workers": workers, "batch": batch,
                   **loader_rate(source, augment, batch=batch, batches=batches, workers=workers)}
            say(f"loader {name}, {workers} workers: {row['images_per_s']:.0f} images/s")
            rows.append(row)
    return rows


def trainer_config(data_dir: str, teacher: str, pipeline: str, source: str):
    """The CIFAR-sized trainer case: RSLAD, WRN-10-1 <- WRN-16-2, digits 16x16, batch 128, 4 epochs of 11 steps."""
    from mmard_jax import config_lib

    c = config_lib.base_config("rslad", "wide_resnet", "digits")
    c.student.kwargs = {"depth": 10, "width": 1}
    c.teacher.checkpoint = teacher
    c.dataset.update(pipeline=pipeline, source=source, data_dir=data_dir)
    c.batch_size, c.num_epochs = 128, 4
    c.eval.update(attacks=("clean",), final_attacks=(), n_examples=128, every_epochs=4)
    c.best_metric = "clean"
    c.checkpoint_every_steps = 0
    return c


def trainer_rows(root: pathlib.Path, say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Part 2: the same run resident, streamed from memory, and streamed from a PNG folder (decoded each step)."""
    import jax
    import jax.numpy as jnp

    from mmard_jax import data, files, train
    from mmard_jax.models import store

    spec = store.model_spec("wide_resnet", 10, {"depth": 16, "width": 2})
    module = store.build_module(spec)
    store.save_model(root / "teacher", spec, jax.jit(lambda k: module.init(k, jnp.zeros((1, 16, 16, 3)), train=False))(
        jax.random.key(1, impl="rbg")))
    for split, folder in (("train", "train"), ("test", "test")):
        ds = data.load_dataset("digits", split)
        write_folder(root / "digits" / folder, ds.images, ds.labels, ".png")
    rows = []
    for pipeline, source, data_dir in (("device", "auto", ""), ("stream", "auto", ""),
                                       ("stream", "folder", str(root / "digits"))):
        config = trainer_config(data_dir, str(root / "teacher"), pipeline, source)
        workdir = root / f"run_{pipeline}_{source}"
        train.train_and_evaluate(config, workdir, progress=False)
        records = files.read_jsonl(workdir / "metrics.jsonl")
        steps = records[0]["step"]
        per_step = [r["seconds"] / steps for r in records[1:-1]]  # the first compiles, the last evaluates
        row = {"part": "trainer", "pipeline": pipeline, "source": "PNG folder" if source == "folder" else "memory",
               "step_s": statistics.median(per_step), "first_epoch_s": records[0]["seconds"], "steps": steps,
               "images_per_s": config.batch_size / statistics.median(per_step)}
        say(f"trainer {pipeline} ({row['source']}): {row['step_s']:.3f} s/step")
        rows.append(row)
    return rows


def demand_rows(case_names: Sequence[str], say: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Part 3: FLOPs per image of each ImageNet case's step (XLA's cost analysis, abstract) and the images/s a GPU
    would take at ASSUMED_MFU of an H100's bf16 peak."""
    from mmard_jax.tools import bench_cases, bench_step

    rows = []
    for name in case_names:
        case = bench_cases.CASES[name]
        per_image = bench_step.step_flops(case) / case.batch
        rates = [share * H100_BF16_TFLOPS * 1e12 / per_image for share in ASSUMED_MFU]
        rows.append({"part": "demand", "case": name, "gflop_per_image": per_image / 1e9,
                     "gpu_images_per_s": rates})
        say(f"demand {name}: {per_image / 1e9:.0f} GFLOP/image, {rates[0]:.0f}-{rates[1]:.0f} images/s per H100")
    return rows


def cores_per_gpu(loader: Sequence[Dict[str, Any]], demand: Sequence[Dict[str, Any]],
                  cores: int) -> List[Dict[str, Any]]:
    """Per demand row: the CPU cores one GPU needs, from the best ImageNet loader rate measured over the `cores` it
    ran on (grain's reading threads and workers keep every core busy, so the rate per core is the best rate / cores)."""
    best = max(r["images_per_s"] for r in loader if r["input"].startswith("ImageNet"))
    per_core = best / cores
    return [{"case": d["case"], "per_core_images_per_s": per_core,
             "cores_per_gpu": [rate / per_core for rate in d["gpu_images_per_s"]]} for d in demand]


def run(worker_counts: Sequence[int], imagenet_images: int, batches: int, demand_cases: Sequence[str],
        say: Callable[[str], None] = print) -> Dict[str, Any]:
    """All three parts in one run, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="mmard_pipeline_") as tmp:
        root = pathlib.Path(tmp)
        loader = loader_rows(root, worker_counts, imagenet_images, batches, say)
        trainer = trainer_rows(root, say)
    demand = demand_rows(demand_cases, say)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"loader": loader, "trainer": trainer, "demand": demand, "cores": cores_per_gpu(loader, demand, cores)}


def markdown(result: Dict[str, Any], processor: str, command: str) -> str:
    """A BENCHMARKS.md section of one run."""
    import datetime

    lines = [f"\n## {datetime.date.today().isoformat()} - Input pipeline (`scripts/benchmark.py --pipeline`)\n",
             f"Processor: {processor}. Command: `{command}`.\n", "| input | grain workers | batch | images/s | first "
             "batch (s) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['input']} | {r['workers']} | {r['batch']} | {r['images_per_s']:.0f} | {r['first_batch_s']:.2f} |"
              for r in result["loader"]]
    lines += ["", "| trainer (RSLAD, WRN-10-1 <- WRN-16-2, digits 16x16, batch 128) | s/step (median, middle epochs) "
              "| images/s | first epoch (s) |", "|---|---:|---:|---:|"]
    lines += [f"| {r['pipeline']}, {r['source']} | {r['step_s']:.3f} | {r['images_per_s']:.0f} | "
              f"{r['first_epoch_s']:.1f} |" for r in result["trainer"]]
    low, high = ASSUMED_MFU
    lines += ["", f"| ImageNet step | GFLOP/image (XLA) | images/s per H100 at {low:.0%}-{high:.0%} of bf16 peak "
              "| loader images/s per CPU core (best rate / cores) | CPU cores per GPU |", "|---|---:|---:|---:|---:|"]
    for d, c in zip(result["demand"], result["cores"]):
        lo, hi = d["gpu_images_per_s"]
        lines.append(f"| {d['case']} | {d['gflop_per_image']:.0f} | {lo:.0f}-{hi:.0f} | "
                     f"{c['per_core_images_per_s']:.0f} | {c['cores_per_gpu'][0]:.1f}-{c['cores_per_gpu'][1]:.1f} |")
    return "\n".join(lines) + "\n"
