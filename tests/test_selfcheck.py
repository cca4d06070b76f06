"""The kernel self-check (nlip_ds/ops/selfcheck.py), exercised on the CPU: the CPU is made a checked device type
and the kernel entry is replaced by one that perturbs the loss or a gradient, as a miscompiled GPU kernel would."""
import logging

import pytest
import torch

import nlip_ds.ops.contrastive as contrastive
from nlip_ds.ops import fused_contrastive_loss, selfcheck


@pytest.fixture(autouse=True)
def checked_cpu(monkeypatch):
    """CPU treated like CUDA: checked on first use, with a fresh result table."""
    monkeypatch.setattr(selfcheck, "CHECK_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(selfcheck, "_results", {})
    monkeypatch.setattr(contrastive, "_warned", set())
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    monkeypatch.delenv(contrastive.DISABLE_ENV, raising=False)


def loss_inputs(n=9, N=20, offset=5, d=8):
    gen = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(N, d, generator=gen), dim=1).requires_grad_()
                for _ in range(2))
    scale = torch.tensor(10.0, requires_grad=True)
    return img[offset:offset + n], txt[offset:offset + n], img, txt, scale, offset


class Perturbed(torch.autograd.Function):
    """Identity forward; backward scales the gradient, as a kernel with a wrong gradient tile would."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


def faulty_forward(real):
    def kernel(ext, *args):
        loss, per_sample = real(ext, *args)
        return loss + 0.05, per_sample  # gradients untouched
    return kernel


def faulty_backward(real):
    def kernel(ext, img_local, *args):
        return real(ext, Perturbed.apply(img_local), *args)
    return kernel


def test_correct_kernel_passes_and_serves(caplog):
    with caplog.at_level(logging.INFO, logger="nlip_ds.ops.selfcheck"):
        fused_contrastive_loss(*loss_inputs())
    assert contrastive.last_impl == "cpu"
    result = selfcheck.results()["cpu"]
    assert result.ok and not result.skipped and result.error <= result.tolerance
    assert "self-check passed on cpu" in caplog.text


@pytest.mark.parametrize("fault", [faulty_forward, faulty_backward], ids=["loss", "gradient"])
def test_faulty_kernel_falls_back_to_reference_and_says_why(fault, monkeypatch, caplog):
    monkeypatch.setattr(contrastive, "_kernel_loss", fault(contrastive._kernel_loss))
    inputs = loss_inputs()
    with caplog.at_level(logging.ERROR, logger="nlip_ds.ops.selfcheck"), \
            pytest.warns(RuntimeWarning, match="failed its self-check on cpu"):
        loss, _ = fused_contrastive_loss(*inputs)
    assert contrastive.last_impl == "reference"
    result = selfcheck.results()["cpu"]
    assert not result.ok and result.error > result.tolerance
    record = next(r for r in caplog.records if r.levelno == logging.ERROR)
    message = record.getMessage()
    assert "self-check FAILED on cpu" in message
    assert f"error {result.error:.3g}" in message and f"tolerance {result.tolerance:.3g}" in message
    assert ("loss" if fault is faulty_forward else "d img_local") in result.detail
    reference, _ = contrastive.fused_contrastive_loss_ref(*inputs)
    assert torch.equal(loss, reference)  # the loss of the reference, not of the faulty kernel
    fused_contrastive_loss(*loss_inputs())  # later calls: no new check, still the reference
    assert contrastive.last_impl == "reference" and len(selfcheck.results()) == 1


def test_throwing_kernel_fails_its_check(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
    monkeypatch.setattr(contrastive, "_kernel_loss", broken)
    with caplog.at_level(logging.ERROR, logger="nlip_ds.ops.selfcheck"), pytest.warns(RuntimeWarning):
        fused_contrastive_loss(*loss_inputs())
    assert contrastive.last_impl == "reference"
    assert "CUBLAS_STATUS_NOT_SUPPORTED" in caplog.text and "error inf" in caplog.text


def test_skip_variable_trusts_the_kernel_without_checking(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "0")
    monkeypatch.setattr(contrastive, "_kernel_loss", faulty_forward(contrastive._kernel_loss))
    fused_contrastive_loss(*loss_inputs())
    assert contrastive.last_impl == "cpu"
    assert selfcheck.results()["cpu"].skipped


def test_unchecked_device_types_are_not_checked(monkeypatch):
    monkeypatch.setattr(selfcheck, "CHECK_DEVICE_TYPES", ("cuda",))
    fused_contrastive_loss(*loss_inputs())
    assert contrastive.last_impl == "cpu" and selfcheck.results() == {}


def test_check_device_runs_the_check_on_demand():
    result = selfcheck.check_device(torch.device("cpu"))
    assert result is not None and result.ok and result.device == "cpu"
    assert selfcheck.results() == {}  # an on-demand check does not decide what the loss uses
