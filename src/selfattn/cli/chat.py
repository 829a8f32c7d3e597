"""``selfattn chat``: a chatbot on a packaged (or any local) causal LM running on selfattn: the
chat template, tokens streamed as they are generated, tokens/s, and pictures of what each
generated token read."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import kv
from .console import UsageError, out_dir
from .threads import CpuWatch

__all__ = ["add_parser", "cmd_chat", "generate_reply", "load_chat_model", "reply_maps"]

#: the packaged causal LMs (selfattn.pretrained) that ``--model`` takes by name
MODELS = ("smollm2", "gemma3")
ATTN = ("selfattn", "sdpa", "eager")
#: layers and heads drawn by ``--show`` when none are asked for
DEFAULT_HEADS = (0, 1, 2)
#: the interactive loop's commands: forget the conversation, end
RESET, EXIT = ("/reset", "/clear"), ("/exit", "/quit")

DESCRIPTION = """\
Answer PROMPT with a causal language model on selfattn (SmolLM2-135M-Instruct by
default, from its PyPI package, converted once into the cache): the model's chat
template, greedy decoding with a KV cache, the reply printed as it is generated.
Only the reply goes to stdout (or, with --json, one JSON object per reply); the
status lines (loading, converting, tokens/s, a reply cut at --max-new-tokens)
go to stderr. --show writes heatmaps and the HTML head view of which prompt and
earlier tokens each generated token read."""

EPILOG = """\
without PROMPT: one message per line from stdin (a terminal or a pipe), until an
empty line or EOF. The conversation is kept: each reply sees the earlier turns.
  /reset, /clear   forget the conversation (a --system message stays)
  /exit, /quit     end (as do Ctrl-D and an empty line; exit status 0)
  Ctrl-C           while a reply is generated: stop it and return to the prompt;
                   at the prompt: end with exit status 130 (as llama-cli does)
with PROMPT, Ctrl-C ends with one line on stderr and exit status 130."""


def add_parser(sub: Any) -> None:
    """Add ``chat`` to the subcommands ``sub`` of the ``selfattn`` parser."""
    s = sub.add_parser(
        "chat",
        help="chat with SmolLM2 (or a local causal LM) running on selfattn",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    s.add_argument("prompt", nargs="?", metavar="PROMPT", help="one message (default: stdin)")
    model = f"{' or '.join(MODELS)} (packaged) or a local transformers folder (default smollm2)"
    s.add_argument("--model", default="smollm2", metavar="NAME|PATH", help=model)
    s.add_argument("--attn", choices=ATTN, default="selfattn", help="attention (default selfattn)")
    cut = "the most tokens per reply (default 200); a reply cut there is marked as cut"
    s.add_argument("--max-new-tokens", type=_positive, default=200, metavar="N", help=cut)
    s.add_argument("--system", metavar="TEXT", help="a system message (default: the template's)")
    s.add_argument("--json", action="store_true", help="print one JSON object per reply")
    s.add_argument("--show", metavar="DIR", help="write pictures of what each new token read")
    layers = "layers drawn by --show (negative counts from the end; default first, middle, last)"
    s.add_argument("--layers", type=int, nargs="+", metavar="L", help=layers)
    heads = f"query heads drawn by --show (default {' '.join(map(str, DEFAULT_HEADS))})"
    s.add_argument("--heads", type=int, nargs="+", metavar="H", help=heads)
    threads = (
        "torch CPU threads (default: torch's, less the cores other processes keep busy, "
        "chosen again for each reply; 1 is steadier if busy)"
    )
    s.add_argument("--threads", type=_positive, metavar="T", help=threads)
    kv.add_arguments(s)
    s.set_defaults(func=cmd_chat)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


# -- the model -------------------------------------------------------------------------------------


def load_chat_model(spec: str, attn: str = "selfattn") -> tuple[Any, Any, str]:
    """``(model, tokenizer, label)`` for ``--model``: a packaged name or a local folder.

    Raises:
        ValueError: a packaged model whose package is missing (the message gives pip).
        UsageError: ``spec`` is neither a packaged name nor a transformers folder.
    """
    from selfattn import pretrained
    from selfattn.pretrained import cache

    if spec in MODELS:
        model, tok = pretrained.load(spec, attn_implementation=attn)
        return model, tok, spec
    path = Path(spec)
    if not (path / "config.json").is_file():
        names = ", ".join(MODELS)
        raise UsageError(f"--model {spec!r} is neither {names} nor a transformers model folder")
    model, tok = cache.load_causal_lm(path, attn)
    return model, tok, path.name


def chat_ids(tok: Any, messages: Sequence[dict[str, str]]) -> Any:
    """The prompt's token ids (1, N): the chat template with the assistant's turn opened, or,
    for a tokenizer without one (a base model), the messages' text joined by newlines."""
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return enc["input_ids"]
    text = "\n".join(m["content"] for m in messages if m["role"] != "system")
    return tok(text, return_tensors="pt")["input_ids"]


def _streamer(tok: Any, write: Callable[[str], None] | None, times: list[float]) -> Any:
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """transformers' streamer (whole words, no special tokens) writing to ``write`` and
        noting when each new token arrives."""

        def put(self, value):
            if not self.next_tokens_are_prompt:
                times.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if write is not None and text:
                write(text)

    return Streamer(tok, skip_prompt=True, skip_special_tokens=True)


def _stopper(stop: Callable[[], bool]) -> Any:
    import torch
    from transformers import StoppingCriteria

    class Stop(StoppingCriteria):
        """Ends generation after the current token once ``stop()`` is true (Ctrl-C)."""

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool)

    return Stop()


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return set(ids)


def generate_reply(
    model: Any,
    tok: Any,
    messages: Sequence[dict[str, str]],
    *,
    max_new_tokens: int = 200,
    write: Callable[[str], None] | None = None,
    stop: Callable[[], bool] | None = None,
    cache_options: dict[str, Any] | None = None,
    session: kv.Session | None = None,
) -> dict[str, Any]:
    """Greedy reply to ``messages`` with transformers' ``generate`` and selfattn's in-place KV
    cache (:func:`selfattn.integrations.transformers.make_cache`), streamed.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        messages: the conversation, ``[{"role": "user", "content": ...}, ...]``.
        max_new_tokens: the most tokens generated.
        write: called with each piece of text as soon as it is decoded (None: silent).
        stop: asked after each token; True ends the reply there (None: never).
        cache_options: ``make_cache``'s keyword arguments (bits, rotate, budget, policy,
            sink_tokens); None: the plain in-place cache.
        session: a conversation's cache, reused when the prompt extends what it holds (its
            options then win over ``cache_options``); None: a fresh cache for this reply.

    Returns:
        ``{"reply", "prompt_ids" (N,), "reply_ids" (T,), "tokens", "seconds",
        "first_token_s", "tokens_per_s", "finish_reason", "kv_cache_bytes", "prefill_tokens"}``
        (``kv_cache_bytes``: the cache's size at the end of the reply; ``prefill_tokens``: the
        prompt tokens run this turn, the others being in the conversation's cache); the ids are 1-D tensors, the reply
        ends at the model's end-of-turn token (which is counted but not shown).
        ``finish_reason`` is "stop" (the model ended its turn), "length" (cut at
        ``max_new_tokens``) or "interrupted" (``stop()`` became true).
    """
    import torch
    from transformers import StoppingCriteriaList

    from selfattn.integrations.transformers import make_cache

    ids = chat_ids(tok, messages)
    if session is None:
        cache = make_cache(model, **(cache_options or {}))
    else:
        cache = session.cache_for(ids)
    prefill = int(ids.shape[1] - cache.get_seq_length())  # the rest is in the cache already
    times: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    extra = {} if stop is None else {"stopping_criteria": StoppingCriteriaList([_stopper(stop)])}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            cache=cache,
            streamer=_streamer(tok, write, times),
            **extra,
        )
    seconds = time.perf_counter() - t0
    if session is not None:
        session.remember(out)
    reply_ids = out[0, ids.shape[1] :]
    n = int(reply_ids.numel())
    if n and int(reply_ids[-1]) in _eos_ids(model, tok):
        finish = "stop"
    elif stop is not None and stop():
        finish = "interrupted"
    else:
        finish = "length" if n >= max_new_tokens else "stop"
    return {
        "reply": tok.decode(reply_ids, skip_special_tokens=True).strip(),
        "prompt_ids": ids[0],
        "reply_ids": reply_ids,
        "tokens": n,
        "seconds": seconds,
        "first_token_s": (times[0] - t0) if times else seconds,
        "tokens_per_s": n / seconds if seconds > 0 else 0.0,
        "finish_reason": finish,
        "kv_cache_bytes": int(cache.nbytes),
        "prefill_tokens": prefill,
    }


# -- the pictures ----------------------------------------------------------------------------------


def _token_text(tok: Any, i: int) -> str:
    text = tok.decode([i])
    return text.replace("\n", "\\n") or tok.convert_ids_to_tokens(i)


def _default_layers(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


def reply_maps(
    model: Any,
    tok: Any,
    prompt_ids: Any,
    reply_ids: Any,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Any:
    """What each generated token read: one row per generated token, one column per token
    (prompt and reply) it could see, for the chosen layers and heads.

    The row of a generated token is the query of the position that produced it (the token
    before it), so the columns end at the token before. One forward pass over prompt + reply
    on selfattn's fast path records the queries and keys (:func:`selfattn.viz.
    capture_transformers`), and :func:`selfattn.viz.maps_from_qk` computes just these rows with
    :func:`selfattn.attention_weights`, equal to what the KV-cached decode computed. A model
    on another implementation is switched to selfattn for this pass and back.

    Returns:
        :class:`selfattn.viz.AttentionMaps`, ``query_tokens[i]`` being the token generated at
        position ``i + 1``.
    """
    import torch

    from selfattn.integrations import transformers as sa_hf
    from selfattn.viz import capture_transformers, maps_from_qk

    ids = torch.cat([prompt_ids.reshape(-1), reply_ids.reshape(-1)])
    n_prompt, n = int(prompt_ids.numel()), int(ids.numel())
    if n - n_prompt < 1:
        raise ValueError("the reply has no token to draw")
    cfg = getattr(model.config, "text_config", None) or model.config
    n_layers = int(cfg.num_hidden_layers)
    chosen = _default_layers(n_layers) if layers is None else list(layers)
    bad = [x for x in chosen if not -n_layers <= x < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model of {n_layers} layers")
    chosen = sorted({x % n_layers for x in chosen})
    n_heads = int(cfg.num_attention_heads)
    heads = [h for h in DEFAULT_HEADS if h < n_heads] if heads is None else list(heads)
    previous = model.config._attn_implementation
    if previous != sa_hf.NAME:
        sa_hf.register()
        model.set_attn_implementation(sa_hf.NAME)
    try:
        with capture_transformers(chosen) as captured, torch.no_grad():
            model(input_ids=ids[None, : n - 1])
    finally:
        if previous != sa_hf.NAME:
            model.set_attn_implementation(previous)
    words = [_token_text(tok, int(i)) for i in ids.tolist()]
    return maps_from_qk(
        captured,
        words[: n - 1],
        layers=chosen,
        heads=heads,
        rows=list(range(n_prompt - 1, n - 1)),
        query_tokens=words[1:],
    )


# -- the command -----------------------------------------------------------------------------------


class _CtrlC:
    """Inside the block, a first Ctrl-C (SIGINT) only sets ``pressed``, which ends the reply
    after the current token; a second one raises KeyboardInterrupt as usual. Outside the
    main thread (where Python delivers signals) nothing is installed."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _handle(self, signum, frame) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _note(text: str) -> None:
    """A piece of status on stderr (a prompt, a line's end): never mixed into the reply."""
    sys.stderr.write(text)
    sys.stderr.flush()


def _ask() -> str:
    """One line typed at the ``you>`` prompt; the prompt goes where the reply does not."""
    if sys.stdout.isatty():
        return input("you> ")  # readline redraws the prompt it knows
    _note("you> ")
    return input()


def _lines(ask: bool) -> Iterator[str]:
    """Lines of stdin, one message each, until an empty line or EOF (Ctrl-D)."""
    while True:
        if ask:
            try:
                line = _ask()
            except EOFError:
                _note("\n")
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        line = line.strip()
        if not line:
            return
        yield line


class _Chat:
    """The loaded model and what every turn shares: options, the status console, threads."""

    def __init__(self, args: argparse.Namespace, status: Any, loaded: tuple, watch: CpuWatch):
        import torch

        self.args, self.status, self.watch = args, status, watch
        self.model, self.tok, self.label = loaded
        self.cap = torch.get_num_threads()  # torch's default (OMP_NUM_THREADS, physical cores)
        self.kv = kv.options(args)
        self.session = kv.Session(self.model, self.kv)  # the conversation's cache

    def turn(self, messages: list, show: Path | None, ctrl_c: _CtrlC | None = None) -> dict:
        """One reply: streamed (or as JSON), the markers and speed line, the pictures.
        ``ctrl_c``: the reply stops when it is pressed (None: Ctrl-C raises)."""
        import torch

        args = self.args
        prompt = messages[-1]["content"]
        threads = args.threads or self.watch.threads(self.cap)
        if not args.json and sys.stdout.isatty():  # a label on screen, never in a capture
            _write(f"{self.label}> ")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            r = generate_reply(
                self.model,
                self.tok,
                messages,
                max_new_tokens=args.max_new_tokens,
                write=None if args.json else _write,
                stop=None if ctrl_c is None else (lambda: ctrl_c.pressed),
                session=self.session,
            )
        except KeyboardInterrupt:
            if not args.json:
                _write("\n")  # the reply's line ends before the one-line message
            raise
        finally:
            torch.set_num_threads(previous)
        messages.append({"role": "assistant", "content": r["reply"]})
        finish = r["finish_reason"]
        record = {
            "prompt": prompt,
            "reply": r["reply"],
            "tokens": r["tokens"],
            "seconds": round(r["seconds"], 4),
            "tokens_per_s": round(r["tokens_per_s"], 3),
            "attn": args.attn,
            "model": self.label,
            "prompt_tokens": int(r["prompt_ids"].numel()),
            "first_token_s": round(r["first_token_s"], 4),
            "finish_reason": finish,
            "truncated": finish != "stop",
            "threads": threads,
            "kv_cache_bytes": r["kv_cache_bytes"],
            "prefill_tokens": r["prefill_tokens"],
            "kv_cache": kv.describe(self.kv),
        }
        if show is not None and r["tokens"]:
            from selfattn.viz import write_pictures

            maps = reply_maps(
                self.model,
                self.tok,
                r["prompt_ids"],
                r["reply_ids"],
                layers=args.layers,
                heads=args.heads,
            )
            title = f"{self.label}: what each generated token read"
            files = write_pictures(maps, show, title=title)
            record["show"] = {k: str(p) for k, p in files.items()}
        if args.json:
            print(json.dumps(record, ensure_ascii=False), flush=True)
            return record
        _write("\n")
        if finish == "length":
            self.status.print(
                f"[cut at {_n(r['tokens'], 'token')}: --max-new-tokens]", markup=False
            )
        elif finish == "interrupted":
            self.status.print(f"[stopped at {_n(r['tokens'], 'token')}: Ctrl-C]", markup=False)
        speed = (
            f"{_n(r['tokens'], 'token')} in {r['seconds']:.2f} s: {r['tokens_per_s']:.1f} "
            f"tokens/s (prompt {record['prompt_tokens']} tokens, first token after "
            f"{r['first_token_s']:.2f} s; attn={args.attn}, {_n(threads, 'thread')}); KV cache "
            f"{r['kv_cache_bytes']:,} bytes ({kv.describe(self.kv)})"
        )
        self.status.print(f"[dim]{speed}[/]", soft_wrap=True)
        if "show" in record:
            self.status.print(f"[dim]pictures of what each token read: {show}[/]", soft_wrap=True)
        return record

    def loop(self, base: list, show: Path | None) -> int:
        """Messages from stdin until an empty line, EOF or /exit; the conversation is kept,
        /reset (/clear) forgets it. Returns the exit status."""
        ask = sys.stdin.isatty() and not self.args.json
        if ask:
            hint = "one message per line; /reset forgets the conversation; Ctrl-D or /exit ends"
            self.status.print(f"[dim]{hint}[/]")
        messages = list(base)
        turns = 0
        lines = _lines(ask)
        read = False
        while True:
            try:
                line = next(lines, None)
            except KeyboardInterrupt:  # at the prompt: end, as llama-cli does
                _note("\n")
                return 130
            if line is None:
                break
            read = True
            if line.lower() in EXIT:
                break
            if line.lower() in RESET:
                messages = list(base)
                self.session.reset()
                self.status.print("[conversation cleared]", style="dim", markup=False)
                continue
            turns += 1
            messages.append({"role": "user", "content": line})
            folder = None if show is None else out_dir(str(show / f"turn-{turns}"))
            with _CtrlC() as ctrl_c:
                self.turn(messages, folder, ctrl_c)
        if not read and not ask:
            raise UsageError("no PROMPT given and nothing read from stdin")
        return 0


def _loading_note(spec: str) -> str:
    """What the spinner says while ``--model`` loads: a packaged model not yet converted says
    that it is converted now, once."""
    import importlib

    from selfattn import pretrained
    from selfattn.pretrained import cache

    if spec in MODELS:
        mod = importlib.import_module(pretrained.MODELS[spec])
        if not cache.is_converted(mod.NAME, mod.stamp()):
            return f"converting {spec} from its package into {cache.cache_dir()} (once, 1-3 min)"
    return f"loading {spec}"


def cmd_chat(args: argparse.Namespace, con: Any) -> int:
    """Chat with a causal LM on selfattn (one prompt, or lines from stdin)."""
    from rich.console import Console

    from selfattn.testing import torch_threads

    from .explain import quiet_transformers

    quiet_transformers()
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("PROMPT is empty")
    kv.options(args)  # bad KV-cache options end here, before the model loads
    show = out_dir(args.show) if args.show else None
    status = Console(stderr=True, highlight=False)  # stdout carries the replies only
    watch = CpuWatch()  # the first reply's threads: from the CPU others use while we load
    with torch_threads(args.threads):
        t0 = time.perf_counter()
        note = _loading_note(args.model)
        if note.startswith("converting"):  # a line that stays, even where no spinner shows
            status.print(f"[dim]{note}[/]")
        with status.status(f"{note} (attn_implementation={args.attn!r})"):
            loaded = load_chat_model(args.model, args.attn)
        seconds = time.perf_counter() - t0
        status.print(f"[dim]loaded {type(loaded[0]).__name__} in {seconds:.1f} s[/]")
        chat = _Chat(args, status, loaded, watch)
        base = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is None:
            return chat.loop(base, show)
        chat.turn([*base, {"role": "user", "content": args.prompt}], show)
    return 0
