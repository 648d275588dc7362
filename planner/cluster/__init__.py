"""Cluster-scale failure-trace simulation: traces, membership, policies, prediction, the
benchmark tables and plots, and its validation against the runtime. It calls the same
recovery candidates (`planner.recovery`) and cost model as the live runtime."""
