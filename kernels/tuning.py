"""Block sizes and per-backend defaults of the Pallas kernels, kept apart from the kernels so tuning is a one-line diff.

Measured figures belong in the commit message and the issue note that changes a value here.
"""

# Channels per program of the RoIAlign weighted gather: 256-channel FPN features split into two programs per RoI,
# so 1,000 RoIs give 2,000 programs, enough to fill an H100's 132 SMs several times over.
BLOCK_C = 128
NUM_WARPS = 4
NUM_STAGES = 1

# `roi_align(impl=None)` per backend. XLA everywhere until the Pallas kernel has been timed on a GPU against it:
# scripts/benchmark.py ops --impl pallas prints the comparison.
DEFAULT_IMPL = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}
