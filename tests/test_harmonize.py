"""NoiseState lookups of ε by sample id and the estimator's ω = λ·ε, its checkpoints, the `penalty` nitc term,
and NLIPTask's use of each nitc mode."""
import io

import pytest
import torch
import torch.nn.functional as F

from nlip_ds.config import NoiseConfig
from nlip_ds.noise.bank import LossBank
from nlip_ds.noise.estimator import NoiseEstimator
from nlip_ds.noise.gmm import fit_gmm
from nlip_ds.noise.harmonize import NoiseState, penalty_term


def fitted_state(ids: torch.Tensor, seed: int = 0) -> tuple[NoiseState, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    losses = torch.cat([torch.rand(ids.numel() - ids.numel() // 3, generator=g),
                        3.0 + torch.rand(ids.numel() // 3, generator=g)])
    fit = fit_gmm(losses)
    state = NoiseState()
    state.update(fit, ids)
    return state, fit.posterior.float()


def omega_for(state: NoiseState, sample_ids: torch.Tensor, lambda_: float) -> torch.Tensor:
    """ω as training computes it: NoiseEstimator.weights over the ε table `state`."""
    estimator = NoiseEstimator(NoiseConfig(lambda_=lambda_))
    estimator.estimate = state
    return estimator.weights(sample_ids).omega


def test_zero_before_the_first_fit():
    state = NoiseState()
    assert not state.fitted and len(state) == 0
    assert torch.equal(omega_for(state, torch.tensor([0, 5, 2 ** 40]), 0.5), torch.zeros(3))


def test_omega_is_lambda_eps_and_zero_for_unfitted_ids():
    ids = torch.tensor([2, 3, 5, 8, 13, 21, 34, 55, 89])
    state, eps = fitted_state(ids)
    query = torch.tensor([55, 0, 2, 4, 89, 100, 13, 13])  # misses below, between and above the fitted ids
    expected = torch.tensor([eps[7], 0.0, eps[0], 0.0, eps[8], 0.0, eps[4], eps[4]])
    assert torch.equal(state.epsilon_for(query), expected)
    assert torch.equal(omega_for(state, query, 0.5), 0.5 * expected)
    assert omega_for(state, query, 0.5).dtype == torch.float32


def test_a_new_fit_replaces_the_lookup():
    state, _ = fitted_state(torch.arange(30))
    state.epsilon_for(torch.arange(3))  # builds the CPU table
    state2, eps2 = fitted_state(torch.arange(10, 40), seed=1)
    state.update(state2.fit, torch.arange(10, 40))
    assert torch.equal(state.epsilon_for(torch.tensor([0, 10, 39])), torch.tensor([0.0, eps2[0], eps2[-1]]))


@pytest.mark.parametrize("ids,message", [
    (torch.tensor([3, 1, 2] + list(range(4, 31))), "ascending"),
    (torch.tensor([1, 1] + list(range(2, 30))), "distinct"),
    (torch.arange(29), "posterior"),
])
def test_update_checks_ids(ids, message):
    fit = fit_gmm(torch.rand(30))
    with pytest.raises(ValueError, match=message):
        NoiseState().update(fit, ids)


@pytest.mark.parametrize("fitted", [True, False])
def test_state_dict_round_trip(fitted):
    ids = torch.tensor([1, 4, 9, 16, 25, 36])
    state = fitted_state(ids)[0] if fitted else NoiseState()
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = NoiseState()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.fitted == fitted and restored.fit == state.fit
    query = torch.arange(40)
    assert torch.equal(restored.epsilon_for(query), state.epsilon_for(query))
    assert torch.equal(omega_for(restored, query, 0.5), omega_for(state, query, 0.5))


def test_bank_to_fit_to_omega():
    bank = LossBank()
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(500, generator=g)
    noisy = ids % 5 == 0
    losses = torch.where(noisy, 4.0, 1.0) + 0.3 * torch.rand(500, generator=g)
    bank.update(ids, losses, noisy.long())
    fit_ids, fit_losses, _ = bank.losses_since(0)
    fit = fit_gmm(fit_losses)
    state = NoiseState()
    state.update(fit, fit_ids)
    omega = omega_for(state, ids, 0.5)  # (500,) in the batch's order
    assert torch.equal(omega, 0.5 * fit.posterior.float()[ids])
    assert (omega[noisy] > 0.45).all() and (omega[~noisy] < 0.05).all()


def embeddings(n: int, d: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1))


def test_penalty_term_value():
    img, txt = embeddings(7, 16, seed=0)
    omega = torch.rand(7)
    expected = 0.3 * sum(omega[i] * torch.dot(img[i], txt[i]) for i in range(7)) / 7
    torch.testing.assert_close(penalty_term(img, txt, omega, 0.3), expected)
    assert penalty_term(img, txt, torch.zeros(7), 0.3).item() == 0.0


def test_penalty_term_gradients():
    img, txt = embeddings(5, 8, seed=1, dtype=torch.float64)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    omega = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t: penalty_term(v, t, omega, 0.7), (img, txt))
    penalty_term(img, txt, omega, 0.7).backward()
    assert omega.grad is None  # ω is a constant of the loss
    torch.testing.assert_close(img.grad, 0.7 * omega.detach()[:, None] * txt.detach() / 5)


@pytest.mark.parametrize("mode", ["soft_target", "reweight", "penalty"])
def test_task_applies_each_nitc_mode_to_the_contrastive_term(synth_tokenizer, mode):
    from nlip_ds.config import load_config
    from nlip_ds.model import NLIPModel
    from nlip_ds.ops import fused_contrastive_loss_ref
    from nlip_ds.train.task import NLIPTask

    cfg = load_config(None, [f"noise.nitc_mode={mode}", "noise.penalty_mu=0.3"])
    torch.manual_seed(0)
    task = NLIPTask(NLIPModel.from_config(cfg.model, synth_tokenizer), cfg).eval()
    captions = ["a red circle", "IMG_0042.jpg", "a small green star above a blue square", "my photo"]
    ids, mask = synth_tokenizer.encode(captions, cfg.model.text.context_length)
    batch = {"image": torch.randn(4, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    omega = torch.tensor([0.0, 0.5, 0.25, 1.0])
    with torch.no_grad():
        terms = task(batch, omega, 1 - omega)
        img, txt = task.model.encode_image(batch["image"]), task.model.encode_text(ids, mask)
        scale = task.model.logit_scale()
        plain, per_sample = fused_contrastive_loss_ref(img, txt, img, txt, scale)
        expected = {"soft_target": fused_contrastive_loss_ref(img, txt, img, txt, scale, 0, omega)[0],
                    "reweight": ((1 - omega) * per_sample).mean(),
                    "penalty": plain + penalty_term(img, txt, omega, 0.3)}[mode]
    torch.testing.assert_close(terms["contrastive_loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["per_sample_loss"], per_sample, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(terms["contrastive_loss"], plain)  # omega did something
