"""entropy-ops benchmark suite: ours vs naive PyTorch, torch.compile and the peers, in one run.

Run ``python -m benchmarks --help``. Never imported by the library; it uses only
the public functionals of ``entropy_ops`` and the peers' public APIs.
"""
