"""The fused loss under a real differentiable all-gather: 2 and 4 gloo ranks, each computing the loss of its
own block against the gathered batch, reproduce the single-process full-batch loss, per-sample losses and
gradients (features and logit scale) on every rank."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nlip_ds.distributed import free_port

pytestmark = pytest.mark.dist

BATCH, DIM = 24, 16  # global batch divisible by 2 and 4


def global_batch():
    """The same float64 batch on every process: features, logit scale and NLIP weights."""
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=1)
    omega = torch.rand(BATCH, generator=gen, dtype=torch.float64)
    return img, txt, torch.tensor(1 / 0.07, dtype=torch.float64), omega


def single_process_result(omega_on):
    """Loss, per-sample losses and gradients of the full batch in one process (the shared-tensor path)."""
    from nlip_ds.ops import fused_contrastive_loss

    img, txt, scale, omega = global_batch()
    img, txt, scale = (x.clone().requires_grad_() for x in (img, txt, scale))
    loss, per_sample = fused_contrastive_loss(img, txt, img, txt, scale, 0, omega if omega_on else None)
    loss.backward()
    return loss.detach(), per_sample, img.grad, txt.grad, scale.grad


def rank_main(rank, world, port, omega_on, expected):
    """One rank: the features are replicated leaves (as model parameters would be); the rank takes its block,
    gathers all blocks differentiably, and backpropagates its own mean loss. Averaging the leaf gradients over
    ranks, as DeepSpeed averages parameter gradients, must give the full-batch gradient."""
    from nlip_ds.distributed import all_gather_tensor, all_gather_with_grad
    from nlip_ds.ops import fused_contrastive_loss
    from nlip_ds.ops import contrastive

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        img, txt, scale, omega = global_batch()
        img, txt, scale = (x.clone().requires_grad_() for x in (img, txt, scale))
        n = BATCH // world
        rows = slice(rank * n, (rank + 1) * n)
        img_local, txt_local = img[rows], txt[rows]  # (n, d), the same leaf data as the gathered block
        img_all, txt_all = all_gather_with_grad(img_local), all_gather_with_grad(txt_local)  # (BATCH, d)
        loss, per_sample = fused_contrastive_loss(img_local, txt_local, img_all, txt_all, scale, rank * n,
                                                  omega[rows] if omega_on else None)
        assert contrastive.last_impl == "cpu"
        loss.backward()
        for grad in (img.grad, txt.grad, scale.grad):
            dist.all_reduce(grad)
            grad /= world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        got = (mean_loss / world, all_gather_tensor(per_sample), img.grad, txt.grad, scale.grad)
        for name, value, want in zip(("loss", "per-sample", "d img", "d txt", "d scale"), got, expected):
            torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14, msg=f"rank {rank}: {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("omega_on", [False, True], ids=["clip", "omega"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_reproduce_full_batch_gradient(world, omega_on):
    expected = single_process_result(omega_on)
    mp.spawn(rank_main, args=(world, free_port(), omega_on, expected), nprocs=world, join=True)
