"""``python -m launch ...`` is the same as the ``odyssey`` console script."""

from launch.cli import console

console()
