"""Microbenchmarks of the fused ops against eager PyTorch and ``torch.compile`` (installed as
``divkernels.benchmarks``; run ``python -m divkernels.benchmarks --help``)."""
