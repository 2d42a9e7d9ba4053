import pytest
import torch

from models.train.process import flushing_denormals, training_settings


def test_settings_hold_inside_and_come_back_after():
    threads = torch.get_num_threads()
    assert not flushing_denormals()
    with training_settings(threads=1, deterministic=True):
        assert flushing_denormals()
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
    assert not flushing_denormals()
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, back


def test_settings_come_back_after_an_exception():
    with pytest.raises(RuntimeError), training_settings(deterministic=True):
        raise RuntimeError("boom")
    assert not flushing_denormals()
    assert not torch.are_deterministic_algorithms_enabled()
