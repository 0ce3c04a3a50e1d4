"""Kernel backends that implement an op's contract outside its own module (the CUDA extension)."""
