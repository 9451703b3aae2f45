"""The library parts of scripts/: what a script computes lives here, the script keeps its flags and output.

  run_table.py        a paper table's runs in sequence, collected into one Markdown table
  fault_injection.py  SIGKILL a tiny training run at seeded moments, resume, compare bitwise
  bench_cases.py      the benchmarked train-step cases and their data
  bench_step.py       our side of scripts/benchmark.py: the step's FLOPs, its first draws, the JAX row
  bench_report.py     benchmark rows merged, checked for the same work, and laid out as Markdown
  bench_driver.py     every (case, implementation) row in its own worker process
  aa_bench.py         our side of scripts/benchmark_autoattack.py: the trained model, timed runs, the report
  bench_layouts.py    process layouts side by side (scripts/benchmark_multiprocess.py): worker, layouts, table
  profile_ops.py      our side of scripts/profile_ops.py: the student's and its layer types' pieces, timed
  gpu_check.py        scripts/gpu_check.py (gpu_check.sh): the smoke test (part a) and the summary of every part

Nothing here imports torch or tests/peers: the PyTorch side of each benchmark is tests/peers/.
"""
