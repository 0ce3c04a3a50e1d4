"""One module per op: kernels, launcher, ``autograd.Function`` and the public function."""
