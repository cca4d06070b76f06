"""The CUDA extension (tile driver, cuBLAS tile products, epilogue kernels) compiles and links for sm_80 and sm_90
with the local nvcc even without a GPU; only its execution needs one (the CUDA cases of test_contrastive.py)."""
import pytest
import torch
import torch.nn.functional as F

from nlip_ds.ops import extension, fused_contrastive_loss_ref

pytestmark = pytest.mark.cuda_build


def test_cuda_extension_compiles_links_and_runs_where_possible(tmp_path, monkeypatch):
    if extension.cuda_toolkit() is None:
        pytest.skip("no CUDA toolkit (CUDA_HOME with bin/nvcc) or a CPU-only torch: nothing to compile with")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # A100 and H100/H200 machine code
    module = extension.jit_build("cuda", build_directory=str(tmp_path))
    assert module.device == "cuda"
    for symbol in ("stats", "grads", "set_poison_outputs", "set_tile"):
        assert callable(getattr(module, symbol)), symbol
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() not in ((8, 0), (9, 0)):
        pytest.skip("compiled and linked for sm_80 and sm_90; no such GPU here to run it")

    gen = torch.Generator().manual_seed(0)
    v, t = (F.normalize(torch.randn(70, 33, generator=gen), dim=1).cuda() for _ in range(2))
    scale = torch.tensor(14.0, device="cuda")
    module.set_poison_outputs(True)
    stats = module.stats(v[10:40], t[10:40], v, t, scale, 10, False)  # (2, 3, 30)
    lse = stats[:, 0]
    expected, _ = fused_contrastive_loss_ref(v[10:40].double(), t[10:40].double(), v.double(), t.double(),
                                             scale.double(), 10)
    got = 0.5 * (lse - stats[:, 1]).sum(0).mean()
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-5)
