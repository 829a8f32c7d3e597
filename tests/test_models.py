"""GPT (with KV-cached generate), Encoder and ViT; the training examples on tiny budgets."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import selfattn
from selfattn.models import GPT, Encoder, ViT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _gpt(**kw) -> GPT:
    torch.manual_seed(0)
    args = {"vocab_size": 37, "max_len": 32, "embed_dim": 32, "num_layers": 2, "num_heads": 4}
    args.update(kw)
    return GPT(**args)


# -- GPT -------------------------------------------------------------------------------------------


def test_models_is_a_public_submodule():
    assert selfattn.models.GPT is GPT
    assert "models" in selfattn.__all__


def test_gpt_shapes_loss_and_tied_head():
    m = _gpt(num_kv_heads=2)
    idx = torch.randint(0, 37, (3, 10))
    logits = m(idx)
    assert logits.shape == (3, 10, 37)
    logits2, loss = m(idx, idx)
    assert torch.equal(logits, logits2) and loss.shape == ()
    assert 2.0 < loss.item() < 4.5  # near log(37) = 3.6 at initialisation
    assert m.head.weight is m.tok.weight
    assert m.num_params() == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("positions", ["rope", "learned", "alibi"])
def test_gpt_is_causal(positions):
    m = _gpt(positions=positions)
    a = torch.randint(0, 37, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 37  # change only the future
    with torch.no_grad():
        torch.testing.assert_close(m(a)[:, :8], m(b)[:, :8])
        assert not torch.allclose(m(a)[:, 8:], m(b)[:, 8:])


@pytest.mark.parametrize(
    "kw",
    [
        {"positions": "rope", "num_kv_heads": 2},
        {"positions": "learned", "norm": "rmsnorm", "mlp": "swiglu"},
        {"positions": "alibi", "num_kv_heads": 1, "qk_norm": True},
        {"positions": "rope", "window": (4, 0)},
    ],
)
def test_gpt_cached_forward_equals_full_forward(kw):
    m = _gpt(**kw).eval()
    idx = torch.randint(0, 37, (2, 15))
    with torch.no_grad():
        full = m(idx)
        caches = m.make_caches(2, 15)
        parts = [m(idx[:, :6], caches=caches)] + [
            m(idx[:, i : i + 1], caches=caches) for i in range(6, 15)
        ]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-5, rtol=1e-5)


def test_generate_greedy_uses_cache_and_matches_no_cache():
    m = _gpt(num_kv_heads=2)
    prompt = torch.randint(0, 37, (2, 5))
    with_cache = m.generate(prompt, 12, temperature=0)
    without = m.generate(prompt, 12, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 17) and torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    # top_k=1 sampling is greedy too
    assert torch.equal(m.generate(prompt, 12, top_k=1), with_cache)
    # greedy = argmax of the full forward at every step
    logits = m(with_cache[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), with_cache[:, 5:])


def test_generate_sampling_is_seeded_and_restores_mode():
    m = _gpt()
    m.train()
    prompt = torch.randint(0, 37, (3, 2))
    a = m.generate(prompt, 10, temperature=1.3, top_k=5, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 10, temperature=1.3, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and m.training
    assert torch.equal(m.generate(prompt, 0), prompt)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_generate_runs_past_max_len(positions):
    """Past max_len the context restarts from the last half; the model never sees more."""
    m = _gpt(positions=positions, max_len=8)
    prompt = torch.randint(0, 37, (2, 11))  # longer than max_len already
    out = m.generate(prompt, 20, temperature=0)
    assert out.shape == (2, 31) and torch.equal(out[:, :11], prompt)
    # the first new token reads the last 8 prompt tokens only
    assert torch.equal(out[:, 11], m(prompt[:, -8:])[:, -1].argmax(-1))
    # after the restart (cache full at 8 tokens), the next token reads the last 4
    seq = m.generate(prompt[:, -8:], 2, temperature=0)
    assert torch.equal(seq[:, 9], m(seq[:, 5:9])[:, -1].argmax(-1))


def test_gpt_state_dict_round_trip():
    a = _gpt(num_kv_heads=2, qk_norm=True)
    torch.manual_seed(123)
    b = GPT(37, 32, 32, 2, 4, num_kv_heads=2, qk_norm=True)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 37, (2, 9))
    assert torch.equal(a(idx), b(idx))
    assert b.head.weight is b.tok.weight  # still tied after loading


def test_gpt_errors():
    m = _gpt(positions="learned")
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        m(torch.tensor([[1, 40]]))
    with pytest.raises(TypeError, match="integer"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=-1)
    with pytest.raises(ValueError, match="targets"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        GPT(37, positions="sinusoid")
    with pytest.raises(ValueError, match="one KVCache per layer"):
        m(torch.zeros(1, 3, dtype=torch.long), caches=[])


def test_gpt_learns_a_pattern():
    """A few steps of training fit a periodic sequence: the model and its gradients work."""
    torch.manual_seed(0)
    m = GPT(8, 32, 32, 2, 4)
    seq = torch.arange(32).remainder(5).unsqueeze(0).repeat(4, 1)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    out = m.generate(seq[:1, :5], 10, temperature=0)
    assert torch.equal(out[0], torch.arange(15).remainder(5))


# -- Encoder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_padding_invariance(pooling):
    torch.manual_seed(1)
    enc = Encoder(50, 16, 32, 2, 4, num_classes=3, pooling=pooling).eval()
    idx = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = enc(idx, mask)
    assert out.hidden.shape == (2, 9, 32) and out.pooled.shape == (2, 32)
    assert out.logits.shape == (2, 3) and out.attentions is None
    alone = enc(idx[1:, :6])  # the same sequence without padding
    torch.testing.assert_close(out.pooled[1:], alone.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden[1:, :6], alone.hidden, atol=1e-5, rtol=1e-5)


def test_encoder_weights_and_state_dict():
    torch.manual_seed(2)
    enc = Encoder(50, 16, 32, 3, 4)
    idx = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    out = enc(idx, mask, need_weights=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 7, 7)
    assert torch.all(out.attentions[0][0, :, :, 5:] == 0)  # nobody attends to padding
    other = Encoder(50, 16, 32, 3, 4)
    other.load_state_dict(enc.state_dict())
    torch.testing.assert_close(other(idx, mask).pooled, out.pooled)
    assert out.logits is None
    with pytest.raises(ValueError, match="max_len=16"):
        enc(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="pooling"):
        Encoder(50, pooling="max")


# -- ViT -------------------------------------------------------------------------------------------


def test_vit_shapes_weights_state_dict():
    torch.manual_seed(3)
    vit = ViT(image_size=8, patch_size=2, num_classes=10, embed_dim=32, num_layers=2, num_heads=4)
    x = torch.randn(5, 1, 8, 8)
    logits, att = vit(x, need_weights=True)
    assert logits.shape == (5, 10) and len(att) == 2 and att[0].shape == (5, 4, 17, 17)
    torch.testing.assert_close(vit(x), logits)
    other = ViT(8, 2, 1, 10, 32, 2, 4)
    other.load_state_dict(vit.state_dict())
    torch.testing.assert_close(other(x), logits)
    rect = ViT(
        image_size=(4, 8), patch_size=4, in_channels=3, num_classes=2, embed_dim=16, num_layers=1
    )
    assert rect(torch.randn(2, 3, 4, 8)).shape == (2, 2)


def test_vit_errors():
    vit = ViT(embed_dim=16, num_layers=1)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        vit(torch.randn(2, 1, 7, 8))
    with pytest.raises(TypeError, match="float64"):
        vit(torch.randn(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViT(image_size=9, patch_size=2)


# -- training examples (tiny budgets; the committed results come from full runs) --------------------


def test_train_gpt_example_runs(tmp_path):
    train_gpt = _example("train_gpt")
    res = train_gpt.train(
        steps=3, out_dir=tmp_path, batch_size=2, seq_len=16, embed_dim=16, num_layers=1,
        num_heads=2, num_kv_heads=1, eval_every=2, eval_batches=1, sample_chars=5,
    )  # fmt: skip
    saved = json.loads((tmp_path / "gpt_results.json").read_text())
    assert saved["val_loss"] == pytest.approx(res["val_loss"])
    assert len(res["train_curve"]) == 3 and [s for s, _ in res["val_curve"]] == [2, 3]
    assert 2.5 < res["unigram_loss"] < 4.0  # the character-frequency baseline
    assert all(len(s) > 5 for s in res["samples"])
    assert (tmp_path / "gpt_loss.png").stat().st_size > 1000


def test_train_vit_example_runs(tmp_path):
    train_vit = _example("train_vit")
    res = train_vit.train(
        epochs=1, out_dir=tmp_path, batch_size=256, embed_dim=16, num_layers=1, num_heads=2
    )
    assert 0.0 <= res["test_accuracy"] <= 1.0 and res["test_images"] == 360
    assert json.loads((tmp_path / "vit_results.json").read_text())["params"] == res["params"]
    assert (tmp_path / "vit_loss.png").stat().st_size > 1000


def test_committed_training_results_meet_the_targets():
    """The committed full runs: GPT well under the unigram baseline, ViT >= 95% test accuracy."""
    results = EXAMPLES / "results"
    gpt = json.loads((results / "gpt_results.json").read_text())
    vit = json.loads((results / "vit_results.json").read_text())
    assert gpt["val_loss"] < 0.7 * gpt["unigram_loss"]
    assert vit["test_accuracy"] >= 0.95


def test_trainer_data_helpers():
    """The corpus/batching helpers the examples, the ring example and the command share."""
    from selfattn.trainer import char_ids, random_windows, shift_images, unigram_loss

    x, y = random_windows(torch.arange(50), 3, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 7) and torch.equal(y, x + 1)  # targets: one place later
    ids, chars = char_ids("abca")
    assert chars == ["a", "b", "c"] and ids.tolist() == [0, 1, 2, 0]
    # add-one smoothing over {a, b}: p(a) = 3/5, p(b) = 2/5
    assert unigram_loss("aab", "ab") == pytest.approx(-(math.log(0.6) + math.log(0.4)) / 2)
    img = torch.zeros(64, 1, 8, 8)
    img[:, 0, 4, 3] = 1.0
    moved = shift_images(img, torch.Generator().manual_seed(0))
    where = moved[:, 0].nonzero()[:, 1:]  # (64, 2) the pixel's new place
    assert moved.shape == img.shape and len(where) == 64
    assert set(map(tuple, (where - torch.tensor([4, 3])).tolist())) == {
        (a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)
    }


def test_trainer_fit_errors_and_threads():
    from selfattn.trainer import TrainConfig, fit, torch_threads

    with pytest.raises(ValueError, match="resume needs the out_dir"):
        fit(TrainConfig(task="gpt", steps=1), resume=True)
    with pytest.raises(ValueError, match="eval_batches must be a positive int"):
        fit(TrainConfig(task="gpt", eval_batches=0))
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1  # the module's fixture value, restored
