"""Odyssey's launcher: the ``odyssey`` command line and its ``run`` agent.

``odyssey run`` starts workers like ``torchrun`` but keeps the survivors when one dies,
hosts the job's TCPStore, records exits and fences ranks on request. Imports of torch
happen lazily so ``odyssey --help`` stays fast.
"""
