"""Test-session set-up shared by all test modules."""

import os

import torch

# Without a GPU, Triton kernels run on CPU tensors in the interpreter. The variable must be set
# before any kernel is decorated (i.e. before compactfusion.kernels is first imported), so it is
# set here, at collection time, for the whole session and for spawned ranks.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
