"""The gradient-inversion harness: it must recover an input from a noiseless sketched
gradient, fail under DP noise, build messages exactly like the sketch_dp hook, be
deterministic, leave the global RNG alone and reject bad arguments."""

import pytest
import torch

from commcomp import ops
from commcomp.codecs import Sketch
from commcomp.privacy.attack import (AttackResult, infer_label, invert_gradient,
                                     make_attack_model, message_for, num_params,
                                     reconstruction_mse)

KINDS = ["gaussian"] + (["countsketch"] if hasattr(ops, "countsketch") else [])
STEPS = 6  # L-BFGS steps: the 8 x 8 target converges in fewer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # one-image double backwards are fastest single-threaded (and the machine has 2 cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return make_attack_model(image_size=8, width=4, seed=0)  # 1,082 parameters


@pytest.fixture(scope="module")
def target():
    """A smooth 8 x 8 blob in [0, 1] and its label."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    x = torch.exp(-((yy - 3.5) ** 2 + (xx - 2.5) ** 2) / 6).reshape(1, 1, 8, 8)
    return x, torch.tensor([3])


def _sketch(model, kind, ratio=0.25, seed=1):
    d = num_params(model)
    return Sketch(kind, d, int(d * ratio), seed=seed)


def _attack(model, target, kind, sigma=0.0, clip=None, seed=1):
    x, y = target
    sk = _sketch(model, kind)
    msg = message_for(model, x, y, sk, clip_norm=clip, noise_multiplier=sigma,
                      generator=torch.Generator().manual_seed(2))
    return invert_gradient(model, msg, sk, x.shape, 10, steps=STEPS, seed=seed, clip_norm=clip)


@pytest.fixture(scope="module")
def noiseless(model, target):
    return {kind: _attack(model, target, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_recovers_input_from_noiseless_sketch(noiseless, target, kind):
    res = noiseless[kind]
    assert isinstance(res, AttackResult)
    assert int(res.label) == int(target[1])  # iDLG inference from R^T y
    assert reconstruction_mse(res.input, target[0]) < 1e-3
    assert res.loss == min(res.history) and len(res.history) >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_dp_noise_makes_it_fail(model, target, noiseless, kind):
    clean = reconstruction_mse(noiseless[kind].input, target[0])
    noisy = _attack(model, target, kind, sigma=1.0, clip=1.0)
    mse = reconstruction_mse(noisy.input, target[0])
    assert mse >= 10 * max(clean, 1e-4), (clean, mse)
    assert mse > 0.01  # nowhere near a reconstruction (a blank guess scores 0.15 here)


def test_message_for_is_clip_then_noise_then_sketch(model, target):
    x, y = target
    sk, C, sigma = _sketch(model, "gaussian"), 0.5, 0.3
    loss = torch.nn.functional.cross_entropy(model(x), y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    assert g.norm() > C  # the clip is active
    noise = torch.randn(g.numel(), generator=torch.Generator().manual_seed(9)) * (sigma * C)
    want = sk.matrix() @ (g * (C / g.norm()) + noise)
    got = message_for(model, x, y, sk, clip_norm=C, noise_multiplier=sigma,
                      generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # noise in sketch space: clip(R g) + noise with s coordinates
    rg = sk.matrix() @ g
    noise = torch.randn(rg.numel(), generator=torch.Generator().manual_seed(9)) * (sigma * C)
    want = rg * torch.clamp(C / rg.norm(), max=1.0) + noise
    got = message_for(model, x, y, sk, clip_norm=C, noise_multiplier=sigma,
                      noise_placement="sketch", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # no sketch, no clip, no noise: the gradient itself
    torch.testing.assert_close(message_for(model, x, y), g)


def test_deterministic_given_seeds(model, target, noiseless):
    kind = KINDS[0]
    again = _attack(model, target, kind)
    assert torch.equal(again.input, noiseless[kind].input)
    assert again.history == noiseless[kind].history
    other = invert_gradient(model, message_for(model, *target, _sketch(model, kind)),
                            _sketch(model, kind), target[0].shape, 10, steps=1, seed=7)
    first = invert_gradient(model, message_for(model, *target, _sketch(model, kind)),
                            _sketch(model, kind), target[0].shape, 10, steps=1, seed=1)
    assert not torch.equal(other.input, first.input)  # the seed matters
    assert torch.equal(make_attack_model(image_size=8, width=4, seed=0).fc.weight, model.fc.weight)


def test_global_rng_untouched(model, target):
    x, y = target
    before = torch.get_rng_state()
    make_attack_model(image_size=8, width=4, seed=3)
    sk = _sketch(model, "gaussian")
    msg = message_for(model, x, y, sk, clip_norm=1.0, noise_multiplier=1.0)  # OS-entropy generator
    invert_gradient(model, msg, sk, x.shape, 10, steps=1, seed=0, clip_norm=1.0)
    invert_gradient(model, message_for(model, x.repeat(2, 1, 1, 1), y.repeat(2)), None,
                    (2, 1, 8, 8), 10, steps=1, seed=0)  # batch: soft labels from the seed too
    assert torch.equal(torch.get_rng_state(), before)


def test_batch_uses_soft_labels(model, target):
    x = target[0]
    xb, yb = torch.cat([x, x.flip(-1)]), torch.tensor([3, 5])
    res = invert_gradient(model, message_for(model, xb, yb), None, xb.shape, 10, steps=2, seed=0)
    assert res.input.shape == xb.shape and res.label.shape == (2,)


def test_adam_also_runs(model, target):
    x, y = target
    res = invert_gradient(model, message_for(model, x, y), None, x.shape, 10, steps=20, lr=0.1,
                          seed=0, optimizer="adam", tv_weight=1e-4)
    assert len(res.history) == 20 and res.history[-1] < res.history[0]


def test_infer_label_reads_last_layer(model, target):
    x, _ = target
    for c in (0, 7):
        assert infer_label(model, message_for(model, x, torch.tensor([c]))) == c


def _good(model, target, **over):
    x, y = target
    kw = {"model": model, "observed": message_for(model, x, y), "sketch": None,
          "input_shape": x.shape, "num_classes": 10, "steps": 1}
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, match", [
    ({"steps": 0}, "steps"),
    ({"lr": -1.0}, "lr"),
    ({"num_classes": 1}, "num_classes"),
    ({"input_shape": (1, 0, 8)}, "input_shape"),
    ({"input_shape": "1x8x8"}, "input_shape"),
    ({"optimizer": "sgd"}, "optimizer"),
    ({"label": 10}, "labels must lie"),
    ({"label": [1, 2]}, "label must be"),
    ({"seed": -1}, "seed"),
    ({"tv_weight": -0.1}, "tv_weight"),
    ({"observed": torch.zeros(5)}, "observed must be"),
    ({"noise_placement": "bucket"}, "noise_placement"),
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"input_shape": (1, 3, 8, 8)}, "does not fit"),
    ({"num_classes": 5}, "num_classes"),
])
def test_invert_rejects_bad_arguments(model, target, over, match):
    with pytest.raises(ValueError, match=match):
        invert_gradient(**_good(model, target, **over))


def test_message_for_rejects_bad_arguments(model, target):
    x, y = target
    with pytest.raises(ValueError, match="needs clip_norm"):
        message_for(model, x, y, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        message_for(model, x, y, clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="parameters"):
        message_for(model, x, y, Sketch("gaussian", 100, 10, seed=0))
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_mse(x, x[0])
