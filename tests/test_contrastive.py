"""Fused contrastive loss against its float64 reference: loss, per-sample vector and every gradient, over odd
shapes, with and without omega, one process (shared tensors) and one rank of many (n < N), with the kernels'
outputs poisoned (allocated as NaN) so an element a kernel forgets to write fails the comparison."""
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

import nlip_ds.ops.contrastive as contrastive
from nlip_ds.ops import extension, fused_contrastive_loss, fused_contrastive_loss_ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]

# (n, N, row_offset, d): n = 1, 7, 97, 1025; N a multiple of n and not; the local block first, inside, last.
SHAPES = [
    (1, 1, 0, 3),
    (1, 7, 3, 64),
    (7, 7, 0, 257),
    (7, 20, 13, 3),
    (97, 97, 0, 64),
    (97, 388, 194, 257),
    (97, 300, 0, 3),
    (1025, 1025, 0, 3),
    (1025, 2050, 1025, 257),
    (1025, 1500, 475, 64),
]
# One process passes the local tensors as the gathered ones (the shared-tile path); a rank of many does not.
CASES = [(*s, shared) for s in SHAPES for shared in ((True, False) if s[0] == s[1] else (False,))]
# Relative tolerance on max |error| / max |reference|. The reference runs in float64 on the same, already
# rounded, inputs, so losses of half inputs are only off by float32 accumulation; their feature gradients are
# returned in the input dtype and carry its rounding.
LOSS_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-3, torch.float16: 5e-4}


def case_id(case):
    n, N, offset, d, shared = case
    return f"n{n}-N{N}-off{offset}-d{d}-{'shared' if shared else 'gathered'}"


@pytest.fixture(scope="module", autouse=True)
def poisoned_kernels():
    """Every kernel output of this module's runs starts as NaN; the kernels must overwrite all of it."""
    modules = [extension.load("cpu")] + ([extension.load("cuda")] if torch.cuda.is_available() else [])
    assert all(m is not None for m in modules), [extension.load_error(k) for k in extension.KINDS]
    for m in modules:
        m.set_poison_outputs(True)
    yield
    for m in modules:
        m.set_poison_outputs(False)


@pytest.fixture(autouse=True)
def extensions_enabled(monkeypatch):
    monkeypatch.delenv(contrastive.DISABLE_ENV, raising=False)


def make_inputs(n, N, offset, d, omega, seed=0, scale=1 / 0.07, norm=1.0):
    """float64 CPU tensors: L2-normalized (times `norm`) features; the local rows are the gathered block."""
    gen = torch.Generator().manual_seed(seed)
    img_all = norm * F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    txt_all = norm * F.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    return {
        "img_local": img_all[offset:offset + n].clone(), "txt_local": txt_all[offset:offset + n].clone(),
        "img_all": img_all, "txt_all": txt_all, "logit_scale": torch.tensor(scale, dtype=torch.float64),
        "omega": torch.rand(n, generator=gen, dtype=torch.float64) if omega else None, "row_offset": offset,
    }


def run(fn, inputs, dtype, device, shared):
    """fn on fresh leaves of `inputs` (rounded to dtype); returns (loss, per_sample, {leaf name: grad})."""
    names = ["img_local", "txt_local", "logit_scale"] + ([] if shared else ["img_all", "txt_all"])
    leaf_dtype = {"logit_scale": torch.float64 if dtype == torch.float64 else torch.float32}
    # clone: .to() returns the input itself when nothing changes, and two runs must not share leaves (their
    # gradients would accumulate into one tensor, and a comparison of the two would compare it with itself)
    leaves = {k: inputs[k].to(device=device, dtype=leaf_dtype.get(k, dtype)).clone().requires_grad_() for k in names}
    img_all = leaves["img_local"] if shared else leaves["img_all"]
    txt_all = leaves["txt_local"] if shared else leaves["txt_all"]
    omega = None if inputs["omega"] is None else inputs["omega"].to(device)
    loss, per_sample = fn(leaves["img_local"], leaves["txt_local"], img_all, txt_all, leaves["logit_scale"],
                          inputs["row_offset"], omega, inputs.get("form", "soft_target"))
    loss.backward()
    return loss.detach(), per_sample, {k: v.grad for k, v in leaves.items()}


def reference(inputs, dtype, shared):
    """The float64 reference on the same (rounded to dtype) values the kernel sees."""
    features = ("img_local", "txt_local", "img_all", "txt_all")
    rounded = {k: (v.to(dtype).double() if k in features else v) for k, v in inputs.items()}
    return run(fused_contrastive_loss_ref, rounded, torch.float64, "cpu", shared)


def assert_close_scaled(actual, expected, rel, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten output?)"
    err = (actual - expected).abs().max().item()
    # The floor covers values that should be ~0 (n = N = 1: a softmax of one logit has zero gradient).
    bound = rel * max(expected.abs().max().item(), 0.1)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def check_against_reference(inputs, dtype, device, shared):
    loss, per_sample, grads = run(fused_contrastive_loss, inputs, dtype, device, shared)
    assert contrastive.last_impl == device
    ref_loss, ref_per_sample, ref_grads = reference(inputs, dtype, shared)
    assert_close_scaled(loss, ref_loss, LOSS_TOL[dtype], "loss")
    assert_close_scaled(per_sample, ref_per_sample, LOSS_TOL[dtype], "per-sample loss")
    assert not per_sample.requires_grad
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == (torch.float32 if name == "logit_scale" and dtype != torch.float64 else dtype), name
        rel = LOSS_TOL[dtype] if name == "logit_scale" else GRAD_TOL[dtype]
        assert_close_scaled(grad, ref_grads[name], rel, f"d loss / d {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("omega", [False, True], ids=["clip", "omega"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, omega, dtype, device):
    n, N, offset, d, shared = case
    check_against_reference(make_inputs(n, N, offset, d, omega), dtype, device, shared)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", [(97, 97, 0, 64, True), (7, 20, 13, 3, False), (130, 300, 170, 33, False)],
                         ids=case_id)
def test_reweight_form_matches_reference(case, dtype, device):
    n, N, offset, d, shared = case
    inputs = {**make_inputs(n, N, offset, d, omega=True), "form": "reweight"}
    inputs["omega"][:3] = torch.tensor([0.0, 1.0, 1.0])  # mass 1 and mass 0 rows
    check_against_reference(inputs, dtype, device, shared)


def test_reweight_is_the_clean_weighted_mean_of_per_sample_losses():
    inputs = {**make_inputs(40, 40, 0, 8, omega=True), "form": "reweight"}
    loss, per_sample, _ = run(fused_contrastive_loss, inputs, torch.float64, "cpu", True)
    torch.testing.assert_close(loss, ((1 - inputs["omega"]) * per_sample).mean())
    ones = {**inputs, "omega": torch.ones(40, dtype=torch.float64)}  # every pair weighted out: no loss, no gradient
    loss, _, grads = run(fused_contrastive_loss, ones, torch.float64, "cpu", True)
    assert loss.item() == 0.0, loss
    assert all(g.abs().max().item() < 1e-30 for g in grads.values()), grads
    with pytest.raises(ValueError, match="form 'margin' is not one of"):
        run(fused_contrastive_loss, {**inputs, "form": "margin"}, torch.float64, "cpu", True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(97, 97, 0, 64, True), (97, 388, 194, 257, False)], ids=case_id)
def test_half_inputs_match_reference(case, dtype, device):
    n, N, offset, d, shared = case
    check_against_reference(make_inputs(n, N, offset, d, omega=True), dtype, device, shared)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "gathered"])
def test_large_logits_stay_finite_and_exact(shared, device):
    """scale 100 on features of norm 3 gives logits up to +-900: exp would overflow without the running max."""
    inputs = make_inputs(300, 300, 0, 16, omega=True, scale=100.0, norm=3.0)
    check_against_reference(inputs, torch.float32, device, shared)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "gathered"])
def test_zero_omega_is_exactly_clip(shared, device):
    inputs = make_inputs(97, 97, 0, 64, omega=False)
    plain = run(fused_contrastive_loss, inputs, torch.float32, device, shared)
    zero = run(fused_contrastive_loss, {**inputs, "omega": torch.zeros(97, dtype=torch.float64)}, torch.float32,
               device, shared)
    assert torch.equal(plain[0], zero[0]) and torch.equal(plain[1], zero[1])
    for name in plain[2]:
        assert torch.equal(plain[2][name], zero[2][name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", [(97, 97, 0, 33, True), (30, 97, 40, 33, False), (1, 7, 3, 64, False)],
                         ids=case_id)
def test_small_odd_tiles_match_reference(case, dtype, device):
    """5 x 7 tiles: every online merge, tile edge and positive-in-another-tile path runs many times."""
    n, N, offset, d, shared = case
    ext = extension.load(device)
    ext.set_tile(5, 7)
    try:
        check_against_reference(make_inputs(n, N, offset, d, omega=True), dtype, device, shared)
    finally:
        ext.set_tile(0, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "gathered"])
def test_results_are_bitwise_reproducible(shared, device):
    """Tile gradients are added in a fixed order, without atomics: two runs agree bit for bit."""
    inputs = make_inputs(300, 300, 0, 33, omega=True)
    first, second = (run(fused_contrastive_loss, inputs, torch.float32, device, shared) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_tile_setting_is_checked():
    with pytest.raises(RuntimeError, match="tile must be two positive sizes"):
        extension.load("cpu").set_tile(0, 7)


def test_per_sample_ignores_omega_and_single_pair_ignores_omega():
    inputs = make_inputs(7, 20, 13, 3, omega=True)
    with_omega = run(fused_contrastive_loss, inputs, torch.float64, "cpu", False)
    without = run(fused_contrastive_loss, {**inputs, "omega": None}, torch.float64, "cpu", False)
    assert torch.equal(with_omega[1], without[1])
    assert not torch.equal(with_omega[0], without[0])
    single = make_inputs(1, 1, 0, 3, omega=True)
    assert torch.equal(run(fused_contrastive_loss, single, torch.float64, "cpu", True)[0],
                       run(fused_contrastive_loss, {**single, "omega": None}, torch.float64, "cpu", True)[0])


def test_non_finite_input_gives_non_finite_loss():
    inputs = make_inputs(7, 20, 13, 3, omega=False)
    inputs["txt_all"][4, 1] = float("nan")
    loss, _, _ = run(fused_contrastive_loss, inputs, torch.float32, "cpu", False)
    assert torch.isnan(loss)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_gathered(device):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(rows, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
             for rows in (3, 3, 8, 8)]
    scale = torch.tensor(2.5, dtype=torch.float64, device=device, requires_grad=True)
    omega = torch.rand(3, generator=g, dtype=torch.float64).to(device)
    for form in ("soft_target", "reweight"):
        fn = lambda vl, tl, va, ta, s: fused_contrastive_loss(vl, tl, va, ta, s, 5, omega, form)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (*feats, scale)), form
    assert contrastive.last_impl == device


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_shared(device):
    g = torch.Generator().manual_seed(2)
    v, t = (torch.randn(5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_() for _ in range(2))
    scale = torch.tensor(1.5, dtype=torch.float64, device=device, requires_grad=True)
    omega = torch.rand(5, generator=g, dtype=torch.float64).to(device)
    for form in ("soft_target", "reweight"):
        fn = lambda v, t, s: fused_contrastive_loss(v, t, v, t, s, 0, omega, form)[0]  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v, t, scale)), form
    assert contrastive.last_impl == device


def test_dispatch_is_visible_in_attribute_and_debug_log(caplog):
    inputs = make_inputs(7, 7, 0, 3, omega=False)
    with caplog.at_level(logging.DEBUG, logger="nlip_ds.ops.contrastive"):
        run(fused_contrastive_loss, inputs, torch.float32, "cpu", True)
    assert contrastive.last_impl == "cpu"
    assert "ran the cpu implementation" in caplog.text


def test_disable_env_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setenv(contrastive.DISABLE_ENV, "1")
    monkeypatch.setattr(contrastive, "_warned", set())
    inputs = make_inputs(7, 20, 13, 3, omega=True)
    with pytest.warns(RuntimeWarning, match="NLIP_DS_DISABLE_EXT=1"):
        run(fused_contrastive_loss, inputs, torch.float64, "cpu", False)
    assert contrastive.last_impl == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(fused_contrastive_loss, inputs, torch.float64, "cpu", False)


def test_missing_extension_falls_back_with_reason(monkeypatch):
    monkeypatch.setattr(contrastive, "_warned", set())
    monkeypatch.setattr(extension, "_modules", {"cpu": None})
    monkeypatch.setattr(extension, "_errors", {"cpu": "nlip_ds._C_cpu unavailable: build failed"})
    inputs = make_inputs(7, 20, 13, 3, omega=True)
    with pytest.warns(RuntimeWarning, match="build failed"):
        loss, _, _ = run(fused_contrastive_loss, inputs, torch.float64, "cpu", False)
    assert contrastive.last_impl == "reference"
    assert_close_scaled(loss, reference(inputs, torch.float64, False)[0], 1e-12, "fallback loss")


def test_public_function_names_bad_arguments():
    inputs = make_inputs(7, 20, 13, 3, omega=True)
    args = [inputs[k] for k in ("img_local", "txt_local", "img_all", "txt_all", "logit_scale")]
    with pytest.raises(ValueError, match="omega must have shape"):
        fused_contrastive_loss(*args, 13, torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="row_offset 14"):
        fused_contrastive_loss(*args, 14)
    with pytest.raises(ValueError, match="txt_all"):
        fused_contrastive_loss(*args[:3], args[3][:, :2], args[4], 13)


def binding_args(**overrides):
    """Valid arguments of the binding's stats(), float32 CPU, with some replaced."""
    v, t = torch.randn(4, 8), torch.randn(4, 8)
    args = {"img_local": v, "txt_local": t, "img_all": torch.randn(10, 8), "txt_all": torch.randn(10, 8),
            "scale": torch.tensor(3.0), "row_offset": 2, "symmetric": False}
    return {**args, **overrides}


@pytest.mark.parametrize("overrides, message", [
    ({"txt_all": torch.randn(8, 10).T}, "txt_all must be contiguous"),
    ({"img_all": torch.randn(10, 8, dtype=torch.float64)}, "img_all has dtype"),
    ({"txt_local": torch.randn(5, 8)}, "txt_local must have 4 rows"),
    ({"txt_all": torch.randn(10, 7)}, "txt_all has feature dim 7"),
    ({"img_all": torch.randn(10)}, "img_all must be 2-D"),
    ({"img_local": torch.ones(4, 8, dtype=torch.int32)}, "img_local must be float32"),
    ({"img_local": torch.randn(4, 8, device="meta")}, "img_local must be a cpu tensor"),
    ({"row_offset": 7}, "row_offset 7"),
    ({"scale": torch.ones(2)}, "logit_scale must hold one element"),
    ({"symmetric": True}, "symmetric=True requires"),
])
def test_binding_names_the_offending_tensor(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        extension.load("cpu").stats(**binding_args(**overrides))


def test_binding_checks_backward_inputs():
    args = binding_args()
    ok = {"lse": torch.zeros(2, 4), "a": torch.ones(4), "b": torch.zeros(4), "weight": torch.tensor(0.5)}
    ext = extension.load("cpu")
    assert len(ext.grads(**args, **ok)) == 5
    with pytest.raises(RuntimeError, match="lse must be a contiguous"):
        ext.grads(**args, **{**ok, "lse": torch.zeros(2, 5)})
    with pytest.raises(RuntimeError, match="b must have dtype"):
        ext.grads(**args, **{**ok, "b": torch.zeros(4, dtype=torch.float64)})
