"""Serving-side reuse of the cost model: latency and KV-memory estimator, continuous
batching, layout search and the `odyssey plan-serve` CLI."""
