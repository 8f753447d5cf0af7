"""Test options: ``--device`` (or ``TAU_TEST_DEVICE``) runs the loss tests on another device.

``pytest --device cuda`` repeats the reference comparisons of the losses (their values,
gradients and state tables against the NumPy references) with the features, indices and
tables on the GPU; everything else stays on the CPU.
"""

from __future__ import annotations

import os


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--device",
        default=None,
        help="device of the loss tests (cpu, cuda, cuda:1, ...); default $TAU_TEST_DEVICE or cpu",
    )


def pytest_configure(config) -> None:
    device = config.getoption("--device")
    if device:
        os.environ["TAU_TEST_DEVICE"] = device
