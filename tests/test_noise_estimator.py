"""NoiseEstimator on its own (one process): the L_NITC form table and each form's loss, ε/ω/clean weights, the
per-step update of the bank, both refit schedules, and its checkpoint state."""
import math
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nlip_ds.config import ConfigError, NoiseConfig, load_config
from nlip_ds.noise.estimator import EpochSchedule, NoiseEstimator, SampleSchedule
from nlip_ds.noise.forms import NITC_FORMS, nitc_form
from nlip_ds.noise.harmonize import penalty_term
from nlip_ds.noise.metrics import detection_auc
from nlip_ds.ops import contrastive, fused_contrastive_loss_ref

CHECKPOINT_KEYS = {"bank", "noise", "last_refit_epoch", "samples_since_refit", "history"}


def losses_for(ids: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """Two bumps: every third id is noisy (high loss); a spread that depends on the id alone."""
    return torch.where(ids % 3 == 0, 4.0, 1.0) + 0.05 * (ids % 7) + shift


def run_epoch(noise: NoiseEstimator, epoch: int, ids: torch.Tensor, batch: int = 8, step: int = 0) -> list:
    """start_epoch, then observe/refit_if_due per batch as the train loop does; the refits that happened."""
    refits = [noise.start_epoch(epoch, step)]
    for start in range(0, ids.numel(), batch):
        chunk = ids[start:start + batch]
        noise.observe(chunk, losses_for(chunk, 0.1 * epoch), flags=(chunk % 3 == 0).long())
        step += 1
        refits.append(noise.refit_if_due(epoch, step))
    return [r for r in refits if r is not None]


# ---------------------------------------------------------------------------------------------- the form table


def test_config_takes_its_choices_from_the_form_table():
    assert NoiseConfig.__dataclass_fields__["nitc_mode"].metadata["choices"] == tuple(NITC_FORMS)
    with pytest.raises(ConfigError, match="noise.nitc_mode: 'focal' is not one of 'soft_target', 'reweight'"):
        load_config(None, ["noise.nitc_mode=focal"])
    with pytest.raises(ValueError, match="unknown L_NITC form 'focal'; known: soft_target, reweight, penalty"):
        nitc_form("focal")


def test_every_form_names_a_target_form_of_the_fused_op():
    for form in NITC_FORMS.values():
        assert form.op_form is None or form.op_form in contrastive.FORMS, form
        assert form.op_form is not None or form.penalty, f"{form.name} would be the plain CLIP loss"


def test_config_import_stays_free_of_torch():
    code = "import sys, nlip_ds.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mode", list(NITC_FORMS))
def test_nitc_loss_of_each_form(mode):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale, omega = torch.tensor(5.0), torch.tensor([0.0, 0.5, 0.25, 1.0, 0.1, 0.0])
    noise = NoiseEstimator(NoiseConfig(nitc_mode=mode, penalty_mu=0.3))
    loss, per_sample = noise.nitc_loss(img, txt, img, txt, scale, 0, omega)
    plain, plain_l = fused_contrastive_loss_ref(img, txt, img, txt, scale)
    expected = {"soft_target": fused_contrastive_loss_ref(img, txt, img, txt, scale, 0, omega)[0],
                "reweight": ((1 - omega) * plain_l).mean(),
                "penalty": plain + penalty_term(img, txt, omega, 0.3)}[mode]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_sample, plain_l, rtol=1e-5, atol=1e-6)  # the plain l, whatever the form
    zero, _ = noise.nitc_loss(img, txt, img, txt, scale, 0, torch.zeros(6))
    torch.testing.assert_close(zero, plain, rtol=1e-5, atol=1e-6)  # ω = 0 is CLIP's loss in every form


# ------------------------------------------------------------------------------------------ weights, observe


def test_weights_before_and_after_a_fit():
    noise = NoiseEstimator(NoiseConfig(lambda_=0.5, warmup_epochs=1))
    query = torch.tensor([0, 3, 7, 500])
    before = noise.weights(query)
    assert torch.equal(before.epsilon, torch.zeros(4)) and torch.equal(before.omega, torch.zeros(4))
    assert torch.equal(before.clean_prob, torch.ones(4))
    run_epoch(noise, 0, torch.arange(48))
    refit = noise.start_epoch(1, 6)
    eps = refit.fit.posterior.float()  # in the order of refit.ids = 0..47
    w = noise.weights(query)
    assert w.epsilon.dtype == w.omega.dtype == w.clean_prob.dtype == torch.float32
    assert torch.equal(w.epsilon, torch.tensor([eps[0], eps[3], eps[7], 0.0]))  # 500 was never fitted
    assert torch.equal(w.omega, 0.5 * w.epsilon) and torch.equal(w.clean_prob, 1.0 - w.epsilon)
    assert (w.epsilon[:2] > 0.9).all() and w.epsilon[2] < 0.1  # ids 0 and 3 are the noisy ones


def test_observe_keeps_the_previous_loss_of_a_non_finite_one_and_counts_samples():
    noise = NoiseEstimator(NoiseConfig())
    noise.observe(torch.tensor([1, 2, 3]), torch.tensor([1.0, 2.0, 3.0]), flags=torch.tensor([0, 1, -1]))
    noise.observe(torch.tensor([2, 3]), torch.tensor([float("nan"), 30.0]))
    ids, losses, flags = noise.bank.losses_since(0)
    assert ids.tolist() == [1, 2, 3] and losses.tolist() == [1.0, 2.0, 30.0] and flags.tolist() == [0, 1, -1]
    assert noise.samples_since_refit == 5  # the non-finite row counts as a trained sample


def test_disabled_estimator_keeps_omega_zero_and_never_refits():
    noise = NoiseEstimator(NoiseConfig(enabled=False, warmup_epochs=1))
    for epoch in range(3):
        assert run_epoch(noise, epoch, torch.arange(40)) == []
    assert len(noise.bank) == 0 and noise.samples_since_refit == 120
    assert torch.equal(noise.weights(torch.arange(40)).omega, torch.zeros(40))


# ----------------------------------------------------------------------------------------------- schedules


def test_epoch_schedule_refits_once_per_epoch_on_the_last_epoch_after_warmup():
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=2))
    assert isinstance(noise.schedule, EpochSchedule)
    assert run_epoch(noise, 0, torch.arange(0, 40)) == []
    assert run_epoch(noise, 1, torch.arange(20, 60), step=5) == []  # still warm-up
    assert noise.bank.epoch == 1
    refit = noise.start_epoch(2, 10)
    assert refit is not None and (refit.epoch, refit.step) == (2, 10) and noise.bank.epoch == 2
    assert refit.ids.tolist() == list(range(20, 60))  # only the samples updated in epoch 1
    assert torch.equal(refit.losses, losses_for(torch.arange(20, 60), 0.1))
    assert torch.equal(refit.flags, (torch.arange(20, 60) % 3 == 0).to(torch.int8))
    assert refit.metrics["noise/samples"] == 40.0 and "noise/auc" in refit.metrics
    assert noise.history == [{"epoch": 2, "step": 10, **refit.metrics}]
    assert noise.last_refit_epoch == 2 and noise.samples_since_refit == 0
    assert noise.start_epoch(2, 10) is None  # a resume into the same epoch does not refit again
    assert noise.refit_if_due(2, 11) is None  # never within an epoch


def test_epoch_schedule_with_warmup_0_first_refits_at_epoch_1():
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=0))
    assert run_epoch(noise, 0, torch.arange(30)) == []  # no losses yet at the start of epoch 0
    assert noise.start_epoch(0, 4) is None  # nor after a resume into epoch 0, with losses in the bank
    assert [r.epoch for r in run_epoch(noise, 1, torch.arange(30))] == [1]


def test_a_refit_on_fewer_than_two_samples_is_skipped_and_retried_next_epoch(caplog):
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1))
    run_epoch(noise, 0, torch.tensor([5]))
    with caplog.at_level("WARNING", logger="nlip_ds.noise.estimator"):
        assert noise.start_epoch(1, 1) is None
    assert "only 1 sample(s) in the bank" in caplog.text and noise.last_refit_epoch == -1
    run_epoch(noise, 1, torch.arange(30), step=1)
    assert noise.start_epoch(2, 5) is not None


def test_sample_schedule_refits_every_n_samples_on_the_samples_since_the_last_fit():
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, refit_every=24))
    assert isinstance(noise.schedule, SampleSchedule)
    assert run_epoch(noise, 0, torch.arange(0, 48)) == []  # warm-up: counted, not fitted
    assert noise.samples_since_refit == 48
    refits = run_epoch(noise, 1, torch.arange(48, 112))  # 8 batches of 8: due after the 1st, then every 3rd
    assert [r.step for r in refits] == [1, 4, 7]
    assert refits[0].ids.tolist() == list(range(0, 56))  # the warm-up rounds and the first batch
    assert refits[1].ids.tolist() == list(range(56, 80))
    assert refits[2].ids.tolist() == list(range(80, 104))
    assert noise.bank.epoch == 3 and noise.samples_since_refit == 8
    assert noise.start_epoch(2, 8) is None  # never at an epoch start


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("refit_every", [None, 16])
def test_state_round_trip_resumes_the_same_schedule_and_weights(refit_every):
    cfg = NoiseConfig(warmup_epochs=1, refit_every=refit_every, lambda_=0.7)
    noise = NoiseEstimator(cfg)
    for epoch in range(2):
        run_epoch(noise, epoch, torch.arange(40) + 10 * epoch, step=5 * epoch)
    state = noise.state_dict()
    assert set(state) == CHECKPOINT_KEYS  # the keys of RunState's shared checkpoint state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = NoiseEstimator(cfg)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    query = torch.arange(80)
    for a, b in zip(restored.weights(query), noise.weights(query)):
        assert torch.equal(a, b)
    assert (restored.last_refit_epoch, restored.samples_since_refit, restored.history) == \
           (noise.last_refit_epoch, noise.samples_since_refit, noise.history)
    ids = torch.arange(30, 75)
    after, again = run_epoch(noise, 2, ids, step=10), run_epoch(restored, 2, ids, step=10)
    assert [r.step for r in after] == [r.step for r in again] and after
    for a, b in zip(after, again):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.fit.posterior, b.fit.posterior)


# ----------------------------------------------------------------------------------------------- trust test


def _refit_on(noise: NoiseEstimator, losses: torch.Tensor):
    ids = torch.arange(losses.numel())
    noise.start_epoch(0, 0)
    noise.observe(ids, losses.float(), flags=(ids % 2).to(torch.int8))
    return noise.start_epoch(1, 1)


def test_a_fit_of_a_model_at_chance_level_leaves_epsilon_at_zero():
    """Losses spread around ln(32) (a model that cannot tell pairs apart yet): the mixture still splits them,
    but ε must not discard pairs at random; once the clean pairs' loss is well below chance, the fit is used."""
    gen = torch.Generator().manual_seed(0)
    chance = math.log(32)
    at_chance = chance + 0.2 * torch.randn(200, generator=gen)
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1), contrastive_batch=32)
    refit = _refit_on(noise, at_chance)
    assert refit.metrics["noise/trusted"] == 0.0 and refit.fit.noise_rate > 0.0
    assert torch.equal(noise.weights(torch.arange(200)).epsilon, torch.zeros(200))

    learned = torch.where(torch.arange(200) % 2 == 1, chance + 1.0, 0.4) + 0.1 * torch.randn(200, generator=gen)
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1), contrastive_batch=32)
    refit = _refit_on(noise, learned)
    assert refit.metrics["noise/trusted"] == 1.0 and refit.metrics["noise/auc"] > 0.99
    assert noise.weights(torch.tensor([1])).epsilon.item() > 0.9

    # without a contrastive batch (or with trust_ratio high enough) every fit is used
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, trust_ratio=2.0), contrastive_batch=32)
    assert _refit_on(noise, at_chance).metrics["noise/trusted"] == 1.0
    assert NoiseEstimator(NoiseConfig(warmup_epochs=1)).chance_loss is None


def test_a_fit_that_calls_nearly_every_pair_noisy_is_not_used():
    """A model at chance with a few lucky pairs: the mixture's clean component is that low tail (mean well below
    chance, so the first test passes), and the fit calls 97% of the pairs noisy. Reweighting by it would train on
    almost nothing; noise.max_rate refuses it."""
    gen = torch.Generator().manual_seed(1)
    chance = math.log(32)
    losses = torch.cat([0.5 + 0.1 * torch.randn(6, generator=gen), chance + 0.2 * torch.randn(194, generator=gen)])
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1), contrastive_batch=32)
    refit = _refit_on(noise, losses)
    lo, hi = refit.fit.bounds
    assert refit.fit.noise_rate > 0.9 and lo + refit.fit.means[0] * (hi - lo) < 0.8 * chance  # passes the first test
    assert refit.metrics["noise/trusted"] == 0.0
    assert torch.equal(noise.weights(torch.arange(200)).epsilon, torch.zeros(200))
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, max_rate=1.0), contrastive_batch=32)
    assert _refit_on(noise, losses).metrics["noise/trusted"] == 1.0


def test_a_failing_fit_sets_epsilon_back_to_zero():
    """ε of a passing fit describes the model of that epoch; when the next fit fails, training goes back to the
    CLIP loss rather than keep weights from a model that no longer exists."""
    gen = torch.Generator().manual_seed(2)
    chance = math.log(32)
    ids = torch.arange(200)
    learned = torch.where(ids % 2 == 1, chance + 1.0, 0.4) + 0.1 * torch.randn(200, generator=gen)
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1), contrastive_batch=32)
    assert _refit_on(noise, learned).metrics["noise/trusted"] == 1.0
    assert noise.weights(ids).epsilon[1::2].min() > 0.9
    noise.observe(ids, (chance + 0.2 * torch.randn(200, generator=gen)).float(), flags=(ids % 2).to(torch.int8))
    refit = noise.start_epoch(2, 2)
    assert refit.metrics["noise/trusted"] == 0.0
    assert torch.equal(noise.weights(ids).epsilon, torch.zeros(200)) and not noise.estimate.fitted


def test_rank_epsilon_is_one_for_the_highest_losses_and_the_auc_ranks_by_loss():
    """noise.epsilon=rank: ε is 1 for the fit's noise rate x N highest losses and 0 for the rest; the detection AUC
    is the losses' (a 0/1 ε would rank every pair inside a group alike)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.arange(200)
    flags = (ids % 2).to(torch.int8)
    losses = torch.where(ids % 2 == 1, math.log(32) + 0.5, 1.0) + 0.6 * torch.randn(200, generator=gen)
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=1, epsilon="rank", em_init="median"), contrastive_batch=32)
    refit = _refit_on(noise, losses)
    assert refit.metrics["noise/trusted"] == 1.0
    eps = noise.weights(ids).epsilon
    assert set(eps.unique().tolist()) == {0.0, 1.0}
    assert abs(float(eps.sum()) - refit.fit.noise_rate * 200) <= 1
    assert losses[eps == 1].min() > losses[eps == 0].max()
    assert refit.metrics["noise/auc"] == pytest.approx(detection_auc(losses, flags))
    assert refit.metrics["noise/mean_eps"] == pytest.approx(float(eps.mean()))
    with pytest.raises(ConfigError, match="noise.epsilon"):
        load_config(None, ["noise.epsilon=hard"])
    with pytest.raises(ConfigError, match="noise.em_init"):
        load_config(None, ["noise.em_init=mean"])


def test_the_oracle_sets_epsilon_from_the_noise_labels_after_the_warm_up():
    """noise.oracle: ε is the batch's own flag (1 noisy, 0 clean) from epoch warmup_epochs on, whatever the fits
    say; before it, 0. The fits still run and report their detection. A sample without a label stops training."""
    ids = torch.arange(30)
    flags = (ids % 3 == 0).long()
    noise = NoiseEstimator(NoiseConfig(warmup_epochs=2, oracle=True, lambda_=0.5), contrastive_batch=8)
    noise.start_epoch(0, 0)
    assert torch.equal(noise.weights(ids, flags).epsilon, torch.zeros(30))
    run_epoch(noise, 1, ids)
    refits = run_epoch(noise, 2, ids, step=4)
    assert refits and refits[0].metrics["noise/auc"] > 0.99  # the mixture is still fitted and measured
    w = noise.weights(ids, flags)
    assert torch.equal(w.epsilon, flags.float()) and torch.equal(w.omega, 0.5 * flags.float())
    assert torch.equal(w.clean_prob, 1.0 - flags.float())
    with pytest.raises(ValueError, match="noise.oracle needs every training sample's noise label"):
        noise.weights(ids, torch.where(ids == 4, -1, flags))
    with pytest.raises(ValueError, match="noise.oracle needs"):
        noise.weights(ids)
    with pytest.raises(ConfigError, match="noise.oracle: .* noise.enabled=true"):
        load_config(None, ["noise.oracle=true", "noise.enabled=false"])
