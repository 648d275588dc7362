"""Helpers for tests and benchmarks, not for training jobs: ranks as threads in one
process (`threads.run_threads`), the single-process reference run (`reference`) and the
measured memory of a run (`memory.measure_memory`)."""
