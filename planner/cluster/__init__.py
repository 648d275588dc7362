"""Cluster-scale failure-trace simulation: traces, policies, plan lookups, prediction, the
benchmark tables and plots. It calls the same recovery candidates and cost model as the
live runtime."""
