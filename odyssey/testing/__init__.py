"""Helpers for tests and benchmarks, not for training jobs: ranks as threads in one
process (`threads.run_threads`) and the single-process reference run (`reference`)."""
