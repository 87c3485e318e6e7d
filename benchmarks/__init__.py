"""mathgrpo's benchmarks: one script per question, run from the repository root as modules,
`PYTHONPATH=src python -m benchmarks.<script> --help`; benchmarks/README.md says what each answers and how to
run it on a CPU and on a GPU. `benchmarks.common` holds what they share (random models, workloads, timing,
the GPU's measured peaks); `benchmarks.profiling` the profiler breakdown step and update use."""
