"""The KV-cache benchmarks (issue 18) run end to end at a tiny size on SmolLM2's packaged weights:
each script writes its results file with the machine record and its table renders; chunked
scoring gives the same perplexity for any chunking; a budget row never holds more than the
budget (the scripts raise otherwise)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    """benchmarks/<name>.py, imported by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smol():
    from selfattn.pretrained import smollm2

    try:
        smollm2.stamp()
    except ValueError as exc:
        pytest.skip(str(exc))
    return bench("kv_common").load_model("smollm2")


def run(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    assert bench(name).main([*args, "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    meta = result["meta"]
    assert meta["cpu"]["model"] and meta["cpu"]["isa"] and meta["torch_threads"] == 1
    assert meta["torch"] == torch.__version__ and meta["transformers"]
    assert meta["command"].startswith(f"python benchmarks/{name}.py ")
    return result


def test_chunked_scoring_gives_the_same_perplexity_for_any_chunking(smol):
    common = bench("kv_common")
    model, tok = smol
    ids = common.text_ids(tok, 40)
    with torch.inference_mode():
        whole = common.score_chunks(model, ids, common.new_cache(model, "DynamicCache"), 40)
        parts = common.score_chunks(model, ids, common.new_cache(model, "make_cache"), 7)
    assert whole.shape == (39,) and torch.isfinite(whole).all()
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=1e-4)
    assert math.isclose(common.perplexity(whole), math.exp(whole.mean().item()))


def test_kv_perplexity_runs_end_to_end(smol, tmp_path):
    result = run("kv_perplexity", tmp_path, "--tokens", "48", "--chunk", "16", "--caches",
                 "DynamicCache", "make_cache")  # fmt: skip
    rows = {r["cache"]: r for r in result["rows"]}
    assert rows["DynamicCache"]["ppl"] == pytest.approx(rows["make_cache"]["ppl"], rel=1e-5)
    assert rows["make_cache"]["vs_fp32_pct"] == 0
    assert "`make_cache` | " in bench("kv_perplexity").table(result)


def test_kv_streaming_runs_end_to_end(smol, tmp_path):
    result = run("kv_streaming", tmp_path, "--tokens", "64", "--chunk", "16", "--budgets", "32",
                 "--policies", "window", "sink", "snapkv:layer")  # fmt: skip
    full, *budgeted = result["rows"]
    assert full["policy"] == "full" and full["max_held"] == 64
    for r in budgeted:
        assert r["max_held"] <= 32 and math.isfinite(r["ppl"])
    runs = [r["policy"] for r in budgeted]
    assert runs == ["window", "sink", "snapkv:layer"] and not result["meta"]["skipped"]
    text = bench("kv_streaming").table(result)
    assert "| policy | budget 32 |" in text and '| `snapkv`, `heads="layer"` | ' in text


def test_kv_streaming_keep_reruns_the_named_policies_and_keeps_the_other_rows(smol, tmp_path):
    args = ("--tokens", "48", "--chunk", "16", "--budgets", "24")
    first = run("kv_streaming", tmp_path, *args, "--policies", "window", "h2o")
    again = run("kv_streaming", tmp_path, *args, "--policies", "h2o:norm", "h2o", "--keep")
    assert [r["policy"] for r in again["rows"]] == ["full", "window", "h2o", "h2o:norm"]
    old, new = first["rows"][2], again["rows"][2]
    assert new["ppl"] == old["ppl"]  # h2o ran again (not kept, below), with the same result
    assert again["rows"][1] == first["rows"][1]  # window kept as it was
    assert again["meta"]["kept"]["rows"] == ["`window` @ 24"]
    text = bench("kv_streaming").table(again)
    assert "| `h2o`, `normalize=True` | " in text and "Rows kept from an earlier run" in text
    with pytest.raises(ValueError, match="chunk differ"):
        run("kv_streaming", tmp_path, *args[:3], "8", *args[4:], "--policies", "h2o", "--keep")


def test_kv_needles_runs_end_to_end(smol, tmp_path):
    result = run("kv_needles", tmp_path, "--context", "160", "--budget", "64", "--depths", "2",
                 "--needles", "1", "--policies", "sink")  # fmt: skip
    full = result["rows"][0]
    assert full["policy"] == "full" and full["cases"] == 2 and full["max_held"] == 160
    assert [a[0] for a in full["answers"]] == [0.0, 1.0]
    sink = result["rows"][1]
    assert sink["policy"] == "sink" and sink["budget"] == 64 and sink["max_held"] <= 64
    assert "| full cache | " in bench("kv_needles").table(result)


def test_kv_needles_keep_runs_only_the_named_policies_and_keeps_the_other_rows(smol, tmp_path):
    args = ("--context", "160", "--budget", "64", "--depths", "2", "--needles", "1")
    first = run("kv_needles", tmp_path, *args, "--policies", "sink")
    again = run("kv_needles", tmp_path, *args, "--policies", "window", "--keep")
    assert [r["policy"] for r in again["rows"]] == ["full", "window", "sink"]
    assert again["rows"][0]["seconds"] == first["rows"][0]["seconds"]  # not run again
    assert again["rows"][2]["answers"] == first["rows"][1]["answers"]
    assert again["meta"]["policies"] == ["window", "sink"]
    assert again["meta"]["kept"] == {"date": first["meta"]["date"], "rows": ["full", "sink"]}
    assert "Rows kept from an earlier run" in bench("kv_needles").table(again)
    with pytest.raises(ValueError, match="budget differ"):
        run("kv_needles", tmp_path, *args[:3], "48", *args[4:], "--policies", "window", "--keep")


def test_kv_needles_first_number_ignores_separators():
    needles = bench("kv_needles")
    assert needles.first_number(" 52,918.") == "52918"
    assert needles.first_number(" 7341 is it") == "7341"
    assert needles.first_number(" unknown") is None


def test_kv_cache_decode_step_runs_end_to_end(smol, tmp_path):
    result = run("kv_cache", tmp_path, "--contexts", "32", "--rounds", "1", "--pairs",
                 "sdpa:DynamicCache", "selfattn:make_cache")  # fmt: skip
    rows = {(r["attention"], r["cache"]): r for r in result["rows"]}
    assert rows[("sdpa", "DynamicCache")]["vs_dynamic_sdpa"] == 1.0
    assert rows[("selfattn", "make_cache")]["logit_gap"] <= 1e-3
    assert "| 32 | `selfattn` | `make_cache` |" in bench("kv_cache").table(result)
    # the floor: make_cache() after 16 tokens, the step with next to no attention or cache
    (floor,) = [r for r in result["rows"] if r.get("floor")]
    assert floor["floor"] == 16 and floor["logit_gap"] <= 1e-3 and floor["ms"] > 0
    assert "| 32 | `selfattn` | `make_cache() after 16 tokens (floor)` |" in bench(
        "kv_cache"
    ).table(result)
