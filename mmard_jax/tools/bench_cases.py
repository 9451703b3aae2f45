"""The benchmarked train-step cases (method, student, teacher, batch, image size, compute dtype) and their data.

Used by scripts/benchmark.py and scripts/benchmark_multiprocess.py (`mmard_jax.tools.bench_driver`), and by the
PyTorch rows (tests/peers/torch_bench.py): both implementations draw the same batches from `bench_data`.
"""

import dataclasses
from typing import Any, Dict, List, Tuple

# Epoch given to both steps: past IAD's/AdaIAD's 60-epoch warm-up (the full sequence of forwards); the IGDM term's
# weight is then (100 + 1) / 200.
EPOCH = 100


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked step: method (and plug-ins), student and teacher (arch, kwargs; none for PeerAiD, whose peer
    is the student's architecture), batch, image size, compute dtype, classes (labels and classifiers); the teacher's
    classifier kernel is scaled by `teacher_scale` on both sides (a confident teacher, see CPU_LATER)."""

    method: str
    student: str
    student_kwargs: Dict[str, Any]
    teacher: str
    teacher_kwargs: Dict[str, Any]
    batch: int = 128
    size: int = 32
    dtype: str = "float32"
    pgd_steps: int = 10
    note: str = ""
    num_classes: int = 10
    plugins: Tuple[str, ...] = ()
    teacher_scale: float = 1.0


WRN34_10 = ("wide_resnet", {"depth": 34, "width": 10})
WRN16_2 = ("wide_resnet", {"depth": 16, "width": 2})
WRN10_1 = ("wide_resnet", {"depth": 10, "width": 1})
RN18 = ("resnet18", {})
TV_RN18 = ("torchvision_resnet18", {})  # torchvision's ImageNet layout (models/torchvision_resnet.py)
TV_RN50 = ("torchvision_resnet50", {})
TV_WRN50_2 = ("torchvision_wide_resnet50_2", {})
MNV2 = ("mobilenet_v2", {})
NO_TEACHER = ("", {})
# Tiny-ImageNet (64x64, 200 classes): SAAD's PreAct-ResNet-18 student (`pResNet18`, HongsinLee/saad @ 295121c,
# cifar100_models/preresnet.py; the registry's preact_resnet18_saad) and the class of DM-Improves-AT's published
# Tiny-ImageNet teacher (wzekai99/DM-Improves-AT @ b390f25, core/models/ti_wideresnetwithswish.py: SiLU, in-model
# Tiny-ImageNet mean/std, adaptive pooling; mmard_jax/interop/published.py `tiny_linf_wrn28-10`) at depth 16,
# width 2 instead of 28, 10, so that a step takes seconds on a CPU. The statistics are written out (this module
# must not import JAX: scripts/benchmark.py's workers set XLA's flags first); tests/test_benchmark.py checks them
# against the published entry.
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)  # ti_wideresnetwithswish.py:16-19
SAAD_PRN18 = ("preact_resnet18_saad", {})
DM_TINY_WRN16_2 = ("dm_wide_resnet", {"depth": 16, "width": 2, "activation": "silu", "mean": TINY_MEAN,
                                      "std": TINY_STD, "adaptive_pool": True})
DM_TINY_WRN28_10 = ("dm_wide_resnet", {**DM_TINY_WRN16_2[1], "depth": 28, "width": 10})  # tiny_linf_wrn28-10 itself


def _case(method, student, teacher, **kw) -> Case:
    return Case(method, student[0], student[1], teacher[0], teacher[1], **kw)


def transcription(case: Case) -> str:
    """The name of the case's step in the PyTorch transcriptions (tests/peers/published_steps.py STEPS): the method,
    prefixed by its plug-ins ('fair_ard' for ARD with `plugins=fair`, Fair-ARD.py)."""
    return "_".join(tuple(case.plugins) + (case.method,))


def _paper_cases(method: str, student, teacher, name: str, **kw) -> Dict[str, Case]:
    """The bfloat16 case and its float32 twin (what the paper's RTX 3090 ran)."""
    return {name: _case(method, student, teacher, dtype="bfloat16", **kw),
            f"{name}_f32": _case(method, student, teacher, **kw)}


CPU_TINY_IMAGENET = "cpu_adaad_dmwrn16_2_prn18saad_64px"

CASES = {
    # The paper's setting (GPU targets).
    **_paper_cases("mmard", RN18, WRN34_10, "mmard_rn18_wrn34_10"),
    **_paper_cases("mmard", MNV2, WRN34_10, "mmard_mnv2_wrn34_10"),
    **_paper_cases("rslad", RN18, WRN34_10, "rslad_rn18_wrn34_10"),
    # The methods after the paper: they call the teacher at every attack step as MMARD does (PeerAiD: its peer,
    # a second ResNet-18, trained jointly).
    **_paper_cases("adaad", RN18, WRN34_10, "adaad_rn18_wrn34_10"),
    **_paper_cases("adaiad", RN18, WRN34_10, "adaiad_rn18_wrn34_10"),
    **_paper_cases("igdm", RN18, WRN34_10, "igdm_rn18_wrn34_10"),
    **_paper_cases("peeraid", RN18, NO_TEACHER, "peeraid_rn18"),
    # Tiny-ImageNet as configured (64x64, 200 classes): AdaAD, SAAD's PreAct-ResNet-18 <- the published DM WRN-28-10
    # (its device memory: scripts/step_memory.py, BENCHMARKS.md "Device memory").
    **_paper_cases("adaad", SAAD_PRN18, DM_TINY_WRN28_10, "adaad_prn18saad_dmwrn28_10_64px", size=64,
                   num_classes=200),
    # ImageNet as configs/imagenet.py distils (224x224, 1000 classes, PGD-7, the default teacher Salman2020Do_50_2),
    # 32 images per GPU (the recipe's global 256 on 8): GPU targets, and the demand of `--pipeline`'s estimate.
    **_paper_cases("mmard", TV_RN50, TV_WRN50_2, "mmard_tvrn50_tvwrn50_2_224px", size=224, num_classes=1000,
                   batch=32, pgd_steps=7),
    **_paper_cases("rslad", TV_RN18, TV_WRN50_2, "rslad_tvrn18_tvwrn50_2_224px", size=224, num_classes=1000,
                   batch=32, pgd_steps=7),
    # CPU-sized cases: a WRN-16-2 teacher, small students, 16x16 or 32x32 images.
    "cpu_mmard_wrn16_2_wrn10_1_16px": _case("mmard", WRN10_1, WRN16_2, size=16,
                                            note="docs/design.md, \"Performance choices\" case"),
    "cpu_mmard_wrn16_2_wrn10_1_16px_bf16": _case("mmard", WRN10_1, WRN16_2, size=16, dtype="bfloat16"),
    "cpu_mmard_wrn16_2_wrn10_1_32px": _case("mmard", WRN10_1, WRN16_2),
    "cpu_rslad_wrn16_2_wrn10_1_16px": _case("rslad", WRN10_1, WRN16_2, size=16),
    "cpu_mmard_wrn16_2_mnv2_16px": _case("mmard", MNV2, WRN16_2, size=16),
    "cpu_mmard_wrn16_2_rn18_16px": _case("mmard", RN18, WRN16_2, size=16),
    "cpu_adaad_wrn16_2_wrn10_1_16px": _case("adaad", WRN10_1, WRN16_2, size=16),
    "cpu_adaiad_wrn16_2_wrn10_1_16px": _case("adaiad", WRN10_1, WRN16_2, size=16),
    "cpu_igdm_wrn16_2_wrn10_1_16px": _case("igdm", WRN10_1, WRN16_2, size=16),
    "cpu_peeraid_wrn10_1_16px": _case("peeraid", WRN10_1, NO_TEACHER, size=16),
    # Tiny-ImageNet on the CPU: AdaAD (its published attack and loss; the configs' Tiny-ImageNet row pairs it with
    # this student and the full-size teacher) at 64x64, 200 classes; batch 8 and PGD-3 keep a step at seconds.
    CPU_TINY_IMAGENET: _case("adaad", SAAD_PRN18, DM_TINY_WRN16_2, batch=8, size=64, pgd_steps=3, num_classes=200,
                             note="Tiny-ImageNet-shaped"),
    # scripts/gpu_check.sh part (c): a GPU case that compiles in seconds (the loop and conv settings).
    "probe_mmard_rn18_wrn16_2_bf16": _case("mmard", RN18, WRN16_2, dtype="bfloat16"),
    # For tests: seconds, not minutes.
    "tiny": _case("mmard", WRN10_1, WRN10_1, batch=8, size=8, pgd_steps=2),
    "tiny_bf16": _case("mmard", WRN10_1, WRN10_1, batch=8, size=8, pgd_steps=2, dtype="bfloat16"),
    "tiny_peeraid": _case("peeraid", WRN10_1, NO_TEACHER, batch=8, size=8, pgd_steps=2),
}
# The 2023-2026 methods (issue 24) on the CPU, sized as the cpu_* cases above (student WRN-10-1, teacher WRN-16-2,
# batch 128, 16x16, PGD-10): one entry per method, {transcription name: the Case fields beyond those}; each becomes
# the case cpu_<name>_wrn16_2_wrn10_1_16px of the group cpu_sota. A random teacher is near uniform, which leaves two
# losses as float32 noise: SAAD weighs each example by 5 (H - min H), H the teacher's entropy at x' (saad.py:68-78),
# ~1e-5 for a uniform teacher; Fair-ARD's KL at ARD's T = 30 (Fair-ARD.py:21) of two nearly uniform distributions
# cancels. Their first-step losses then differ by more than 1e-4 (8x8 versions of the cases: 2.3e-4 and 5.8e-4), so
# their teacher's classifier kernel is scaled x30, a confident teacher as the robust ones they distil (1.2e-6 and
# 2.3e-6; tests/test_benchmark.py SHARP_TEACHER does the same for SAAD).
CPU_LATER = {
    "saad": {"teacher_scale": 30.0},
    "dgad": {},
    "absld": {},
    "fair_ard": {"method": "ard", "plugins": ("fair",), "teacher_scale": 30.0},
    "fair_rslad": {"method": "rslad", "plugins": ("fair",)},
    # CIARD: the teacher's architecture and start weights for its robust teacher (trained with its own optimizer,
    # config_lib.RTEACHER_OPTIM; the PyTorch side published_steps.CiardScript's), a second random one for its clean
    # teacher; EPOCH is past CIARD.py:291's 50, so the robust teacher's update is timed too.
    "ciard": {},
}


def _cpu_later_case(name: str, fields: Dict[str, Any]) -> Case:
    fields = dict(fields)
    return _case(fields.pop("method", name), WRN10_1, WRN16_2, size=16, **fields)


CASES.update({f"cpu_{name}_wrn16_2_wrn10_1_16px": _cpu_later_case(name, fields) for name, fields in CPU_LATER.items()})
# Fair-ARD's case shrunk for tests (tests/test_benchmark.py): its plug-in and sharpened teacher on both sides, a
# WRN-10-1 teacher, batch 8, 8x8, PGD-2.
CASES["tiny_fair_ard"] = dataclasses.replace(CASES["cpu_fair_ard_wrn16_2_wrn10_1_16px"], teacher_kwargs=WRN10_1[1],
                                             batch=8, size=8, pgd_steps=2)
# The Tiny-ImageNet case shrunk for tests (tests/test_benchmark.py): the same method, architectures (the student at
# base width 4, the teacher at depth 10, width 1), 64x64 inputs and 200 classes; batch 4, PGD-1.
CASES["tiny_64px"] = dataclasses.replace(
    CASES[CPU_TINY_IMAGENET], student_kwargs={**SAAD_PRN18[1], "base_width": 4},
    teacher_kwargs={**DM_TINY_WRN16_2[1], "depth": 10, "width": 1}, batch=4, pgd_steps=1, note="")

# The same-work check in float64 (`--cases=cpu_f64 --torch_forms=f64`): the CPU cases' networks in float64 on both sides
# (ours under jax.enable_x64, parameters stored in float32; PyTorch's 'f64' form), where float32 rounding alone moves
# MobileNetV2's first-step loss past the float32 rule (BENCHMARKS.md "Open"); `tiny_f64` for tests.
F64_CASES = ("cpu_mmard_wrn16_2_wrn10_1_16px", "cpu_mmard_wrn16_2_mnv2_16px", "cpu_rslad_wrn16_2_wrn10_1_16px",
             "cpu_peeraid_wrn10_1_16px", "tiny")
CASES.update({f"{name}_f64": dataclasses.replace(CASES[name], dtype="float64") for name in F64_CASES})

# Named groups for --cases.
GROUPS = {
    "paper": "mmard_rn18_wrn34_10,mmard_mnv2_wrn34_10,rslad_rn18_wrn34_10",
    "paper_f32": "mmard_rn18_wrn34_10_f32,mmard_mnv2_wrn34_10_f32,rslad_rn18_wrn34_10_f32",
    "paper_sota": "adaad_rn18_wrn34_10,adaiad_rn18_wrn34_10,igdm_rn18_wrn34_10,peeraid_rn18",
    "paper_sota_f32": "adaad_rn18_wrn34_10_f32,adaiad_rn18_wrn34_10_f32,igdm_rn18_wrn34_10_f32,peeraid_rn18_f32",
    "cpu": "cpu_mmard_wrn16_2_wrn10_1_16px,cpu_mmard_wrn16_2_mnv2_16px,cpu_rslad_wrn16_2_wrn10_1_16px",
    "cpu_f64": ",".join(f"{name}_f64" for name in F64_CASES if name != "tiny"),
    "cpu_sota": ",".join(["cpu_adaad_wrn16_2_wrn10_1_16px", "cpu_adaiad_wrn16_2_wrn10_1_16px",
                          "cpu_igdm_wrn16_2_wrn10_1_16px", "cpu_peeraid_wrn10_1_16px"]
                         + [f"cpu_{name}_wrn16_2_wrn10_1_16px" for name in CPU_LATER]),
    "tiny_cpu": CPU_TINY_IMAGENET,
    "tiny_gpu": "adaad_prn18saad_dmwrn28_10_64px,adaad_prn18saad_dmwrn28_10_64px_f32",
    "imagenet_gpu": "mmard_tvrn50_tvwrn50_2_224px,rslad_tvrn18_tvwrn50_2_224px",
}


def case_names(text: str) -> List[str]:
    """Comma-separated case names and GROUPS -> the case names; ValueError naming the unknown ones."""
    names = [n for g in text.split(",") if g for n in GROUPS.get(g, g).split(",")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return names


def describe(case: Case) -> str:
    """'MMARD, student resnet18 {...} <- teacher wide_resnet {...}, batch 128, 32x32, bfloat16, PGD-10' (and the
    classes where not 10)."""
    kw = lambda d: (" " + ",".join(f"{k}={v}" for k, v in d.items())) if d else ""  # noqa: E731
    source = f"teacher {case.teacher}{kw(case.teacher_kwargs)}" if case.teacher else "peer = the student's architecture"
    method = case.method.upper() + "".join(f" + {p}" for p in case.plugins)
    return (f"{method}, student {case.student}{kw(case.student_kwargs)} <- {source}, batch {case.batch}, "
            f"{case.size}x{case.size}, {case.dtype}, PGD-{case.pgd_steps}"
            + (f", {case.num_classes} classes" if case.num_classes != 10 else "")
            + (f", teacher's classifier x{case.teacher_scale:g}" if case.teacher_scale != 1.0 else "")
            + (f" ({case.note})" if case.note else ""))


def bench_data(case: Case, total: int, seed: int = 0):
    """The split and the batches both workers use: uint8 images [N, H, W, 3], labels [N], indices [total, B]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_images = max(4 * case.batch, 512)
    images = rng.integers(0, 256, (n_images, case.size, case.size, 3), dtype=np.uint8)
    labels = rng.integers(0, case.num_classes, n_images).astype(np.int32)
    idx = np.stack([rng.permutation(n_images)[: case.batch] for _ in range(total)]).astype(np.int32)
    return images, labels, idx
