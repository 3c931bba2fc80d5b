"""The CPU suite hides GPUs unless the gpu tests are selected (device_selection)."""
import os

import pytest

from device_selection import gpu_tests_selected


@pytest.mark.parametrize("markexpr, selected", [
    ("", False), (None, False), ("slow", False), ("not gpu", False), ("not slow and not gpu", False),
    ("gpu", True), ("gpu and not slow", True), ("slow or gpu", True), ("(gpu)", True),
])
def test_gpu_tests_selected_by_marker_expression(markexpr, selected):
    assert gpu_tests_selected(markexpr) is selected


def test_this_session_hides_gpus_unless_asked(pytestconfig):
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert hidden is not gpu_tests_selected(pytestconfig.option.markexpr)
