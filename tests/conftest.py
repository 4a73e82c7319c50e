"""Test-wide settings."""

import torch

# The suite runs many tiny models on 2 (often busy) cores, where one intra-op thread is several times faster than
# two fighting over the cores. CLI subprocesses keep torch's default.
torch.set_num_threads(1)
