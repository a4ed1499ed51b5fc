"""A torch / torchvision mismatch fails at import with one sentence that says how to fix it."""
import pytest
import torchvision.ops

from distill._compat import BrokenInstallError, check_torchvision_ops


def test_working_install_passes():
    check_torchvision_ops()


def test_missing_compiled_ops_give_one_clear_sentence(monkeypatch):
    def broken_nms(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", broken_nms)
    with pytest.raises(BrokenInstallError) as info:
        check_torchvision_ops()
    message = str(info.value)
    assert "\n" not in message
    assert "operator torchvision::nms does not exist" in message
    assert "pip install -c constraints.txt --force-reinstall torch torchvision" in message
