"""scripts/step_memory.py's accounting (mmard_jax.tools.bench_memory) against XLA's own totals on a tiny case."""

import fast_compile
from mmard_jax.tools import bench_memory
from mmard_jax.tools.bench_cases import CASES

# XLA:CPU's cheaper LLVM passes (tests/fast_compile.py): the same buffers, compiled in a fraction of the time.
FAST_COMPILE = fast_compile.OPTIONS


def test_step_memory_accounts_for_every_argument():
    """The resident split is the images' uint8 bytes plus int32 labels; XLA's argument total is the split, the trained
    state and the teachers' variables plus the batch's indices and the epoch; the donated state is reused for the
    outputs; the peak counts the temporaries on top."""
    case, n_images = CASES["tiny"], 64
    m = bench_memory.step_memory(case, n_images, compiler_options=FAST_COMPILE)
    assert m.data == n_images * case.size * case.size * 3 + 4 * n_images
    assert 0 <= m.arguments - (m.data + m.trained + m.frozen) <= 4 * case.batch + 4
    assert m.aliased == m.trained  # the whole state is donated and written back in place
    assert m.temporaries > 0 and m.peak == m.arguments + m.outputs - m.aliased + m.temporaries
    # WRN-10-1 student and teacher: 77,850 parameters each (conv 3x3 16/16/32/64 + BatchNorms + Linear(64, 10)).
    assert m.params == {"student": 77850, "teacher": 77850}
    # The teacher: float32 parameters and the mean and variance of its BatchNorms (16, 16, 16, 32, 32, 64, 64 channels).
    assert m.frozen == 4 * (77850 + 2 * (16 + 16 + 16 + 32 + 32 + 64 + 64))


def test_table_prints_gigabytes():
    m = bench_memory.StepMemory(data=1_228_800_000 + 400_000, trained=10**8, frozen=2 * 10**8, arguments=1_529_200_516,
                                outputs=10**8, aliased=10**8, temporaries=3 * 10**9,
                                params={"student": 11_276_232, "teacher": 36_536_008})
    text = bench_memory.table([{"case": "c", "n_images": 100_000, "memory": m}])
    assert "| c | 100,000 | 1.23 GB | 0.10 GB | 0.20 GB | 3.00 GB | 0.00 GB | **4.53 GB** |" in text
    assert "student 11.3 M, teacher 36.5 M" in text
    assert m.peak == 4_529_200_516
