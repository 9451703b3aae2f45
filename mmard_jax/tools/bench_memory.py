"""Device memory of one train step, from XLA's buffer assignment of the compiled program (scripts/step_memory.py).

The step of a benchmark case (`bench_cases`) is lowered on abstract inputs (`jax.eval_shape`: no weights, no data)
with the whole training split resident, as `train.train_and_evaluate` keeps it, compiled for the local backend, and
`compiled.memory_analysis()` read: the arguments (the split, the students' state, the teachers' variables), the
outputs, the part of the outputs that reuses donated arguments (the state is donated), and the temporaries
(activations, gradients, the attack's iterates). Peak = arguments + outputs - aliased + temporaries: what must fit
at once. On the CPU this is the CPU compiler's plan; a GPU's fusions and convolution workspaces differ, so it is an
estimate of the GPU's figure, not its measurement.
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional

from mmard_jax.tools.bench_cases import Case


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes of one compiled train step: its argument groups, and XLA's totals."""

    data: int  # the resident split: uint8 images and int32 labels
    trained: int  # the trained networks' state (parameters, BatchNorm statistics, optimizer state) and counters
    frozen: int  # the teachers' variables
    arguments: int  # XLA: all arguments (data + trained + frozen + the batch's indices and the epoch)
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int
    params: Dict[str, int]  # parameters per network

    @property
    def peak(self) -> int:
        """What must be resident at once: arguments, outputs not aliased to them, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def tree_bytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) in `tree`; typed PRNG keys count their key data."""
    import jax
    import numpy as np

    def nbytes(leaf) -> int:
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, leaf)
            return math.prod(data.shape) * np.dtype(data.dtype).itemsize
        return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

    return sum(nbytes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def step_memory(case: Case, n_images: int, unroll: str = "1",
                compiler_options: Optional[Dict[str, Any]] = None) -> StepMemory:
    """Compiles `case`'s step (PGD loop rolled by default, as on GPUs) with `n_images` images resident; its memory.
    `compiler_options` go to XLA (tests: its cheaper LLVM passes)."""
    from mmard_jax.models import count_params
    from mmard_jax.tools import bench_step

    build, nets, method, txs, _ = bench_step.jax_step_builder(case)
    args = bench_step._abstract_args(case, nets, method, txs, n_images)
    state, frozen, images, labels = args[:4]
    analysis = build(case.pgd_steps, unroll).lower(*args).compile(compiler_options=compiler_options).memory_analysis()
    params = {name: count_params(s.params) for name, s in state.nets.items()}
    params.update({name: count_params(v) for name, v in frozen.items()})
    return StepMemory(
        data=tree_bytes((images, labels)), trained=tree_bytes(state), frozen=tree_bytes(frozen),
        arguments=analysis.argument_size_in_bytes, outputs=analysis.output_size_in_bytes,
        aliased=analysis.alias_size_in_bytes, temporaries=analysis.temp_size_in_bytes, params=params)


def gb(n: int) -> str:
    """Bytes as decimal GB with two decimals."""
    return f"{n / 1e9:.2f} GB"


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of {'case', 'n_images', 'memory': StepMemory} rows (BENCHMARKS.md, "Device memory")."""
    lines = ["| case | images resident | data | trained state | teachers | temporaries | outputs not aliased "
             "| peak | parameters |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        m = row["memory"]
        params = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in m.params.items())
        lines.append(f"| {row['case']} | {row['n_images']:,} | {gb(m.data)} | {gb(m.trained)} | {gb(m.frozen)} "
                     f"| {gb(m.temporaries)} | {gb(m.outputs - m.aliased)} | **{gb(m.peak)}** | {params} |")
    return "\n".join(lines)
