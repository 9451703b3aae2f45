"""The processor a measurement ran on, read from Linux's /proc/cpuinfo and sysfs, for every benchmark row.

CPU timings and the CPU defaults measured from them hold on one processor kind: each benchmark section names the
model, x86 family/model (two "AMD EPYC" names can be different generations), usable cores, last-level cache and
vector extension, so a row is never read as another machine's."""

from __future__ import annotations

import os
import pathlib
from typing import Dict, Optional

from mmard_jax import batch_plan

CPUINFO = "/proc/cpuinfo"
VECTOR_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd")  # widest first; the first one present is named


def _first_block(text: str) -> Dict[str, str]:
    """The `key: value` lines of /proc/cpuinfo's first processor block."""
    fields: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def processor(cpuinfo: str = CPUINFO, cache_root: str = "/sys/devices/system/cpu/cpu0/cache") -> Dict[str, object]:
    """{model, family, model_number, cores, l3_bytes, isa} of this machine (None for what cannot be read)."""
    try:
        fields = _first_block(pathlib.Path(cpuinfo).read_text())
    except OSError:
        fields = {}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {
        "model": fields.get("model name") or fields.get("Model") or fields.get("CPU part"),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "l3_bytes": batch_plan.cache_bytes(cache_root),
        "isa": next((isa for isa in VECTOR_ISAS if isa in flags), None),
    }


def _mib(n: Optional[int]) -> str:
    return "unknown" if not n else f"{n / 2 ** 20:g} MiB"


def describe(p: Optional[Dict[str, object]] = None) -> str:
    """One line naming the processor, e.g. 'AMD EPYC (x86 family 25 model 17), 2 cores, 32 MiB L3, avx512f'."""
    p = processor() if p is None else p
    kind = f" (x86 family {p['family']} model {p['model_number']})" if p.get("family") else ""
    return (f"{p.get('model') or 'unknown processor'}{kind}, {p.get('cores')} cores, "
            f"{_mib(p.get('l3_bytes'))} last-level cache, {p.get('isa') or 'unknown vector ISA'}")
