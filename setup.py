"""Packaging for entropy-ops.

The folders ``kernels/`` and ``trainers/`` install *under* the ``entropy_ops``
namespace (``entropy_ops.kernels``, ``entropy_ops.trainers``) through
``package_dir``, so nothing of ours is importable as a bare ``kernels`` (the
name of an unrelated Hugging Face package) or ``trainers``.
"""
from setuptools import setup

setup(
    packages=[
        "entropy_ops",
        "entropy_ops.integrations",
        "entropy_ops.kernels",
        "entropy_ops.trainers",
        "entropy_ops.trainers.algorithms",
    ],
    package_dir={
        "entropy_ops": "entropy_ops",
        "entropy_ops.integrations": "entropy_ops/integrations",
        "entropy_ops.kernels": "kernels",
        "entropy_ops.trainers": "trainers",
        "entropy_ops.trainers.algorithms": "trainers/algorithms",
    },
    package_data={"entropy_ops.trainers": ["assets/*", "assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
)
