"""`xlaserve generate`: one prompt, or a JSONL batch job.

Single prompt:  xlaserve generate [--model M] --prompt TEXT [--max-tokens N] [--temperature T]
                [--seed S] [--json]
Batch job:      xlaserve generate --model M --input prompts.jsonl --output results.jsonl [...]

Batch input lines: {"id", "prompt" | "messages", optional sampling fields} or the OpenAI batch
format {"custom_id", "body": {"prompt" | "messages", sampling fields}}. Each result is appended
to --output as one JSON line as soon as it finishes (id, text, token_ids, finish_reason, usage,
timings); a re-run with the same --output skips the ids already there, so a killed job loses
nothing it wrote. A malformed line gets its own result line with "error" and never stops the job.
Progress (tokens/s) and a summary (throughput, TTFT and latency percentiles) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, TextIO

import numpy as np

from xlaserve.cli import UsageError
from xlaserve.engine_args import add_engine_args, engine_config_from_args

# Per-line sampling fields (OpenAI names accepted too) -> SamplingParams field.
SAMPLING_FIELDS = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "min_tokens": "min_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "seed": "seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "n": "n", "top_logprobs": "logprobs",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    io = parser.add_argument_group("input and output")
    io.add_argument("--prompt", help="generate for this one prompt")
    io.add_argument("--input", help="JSONL batch input file")
    io.add_argument("--output", help="JSONL results file (appended; done ids are skipped)")
    io.add_argument("--json", action="store_true", help="single prompt: print one JSON object")
    io.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    s = parser.add_argument_group("sampling defaults (a batch line may override them)")
    s.add_argument("--max-tokens", type=int, help="tokens to generate (default 16)")
    s.add_argument("--min-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--n", type=int, help="samples per prompt")
    s.add_argument("--ignore-eos", action="store_true", default=None)


def _sampling_defaults(args: argparse.Namespace) -> dict[str, Any]:
    from xlaserve.runtime.request import SamplingParams

    names = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "n",
             "ignore_eos")
    out = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    try:
        SamplingParams(**out)
    except ValueError as e:
        field, _, rest = str(e).partition("=")
        raise UsageError(f"--{field.replace('_', '-')}={rest}") from e
    return out


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input is None):
        raise UsageError("give exactly one of --prompt or --input")
    if args.input is not None:
        if not pathlib.Path(args.input).is_file():
            raise UsageError(f"--input={args.input!r}: no such file")
        if not args.output:
            raise UsageError("--output: required with --input")
        if not pathlib.Path(args.output).absolute().parent.is_dir():
            raise UsageError(f"--output={args.output!r}: its directory does not exist")
    defaults = _sampling_defaults(args)
    cfg = engine_config_from_args(args)
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.llm import LLM

    try:
        llm = LLM(engine=Engine.from_config(cfg))
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.prompt is not None:
        return _single(llm, args, defaults)
    return _batch(llm, args, defaults)


def _single(llm: Any, args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    from xlaserve.runtime.request import SamplingParams

    if args.seed is not None:
        defaults["seed"] = args.seed
    try:
        out = llm.generate(args.prompt, SamplingParams(**defaults))[0]
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason,
                          "usage": _usage(out)}))
    else:
        print(out.text)
    return 0


def _usage(gen: Any) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in gen.outputs)
    prompt = len(gen.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": gen.outputs[0].num_cached_tokens}


def _done_ids(path: pathlib.Path) -> set[str]:
    done: set[str] = set()
    if not path.exists():
        return done
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when a previous run was killed
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                done.add(rec["id"])
    return done


class _Line:
    """One parsed input line."""

    def __init__(self, lineno: int, rid: str, custom: bool):
        self.lineno, self.id, self.custom = lineno, rid, custom


def parse_line(text: str, lineno: int, defaults: dict[str, Any],
               tokenizer: Any) -> tuple[str, bool, list[int] | None, Any, str | None]:
    """Parses one input line.

    Returns:
      (id, is_openai_format, prompt token ids or None, SamplingParams or None, error or None).
    """
    from xlaserve.runtime.request import SamplingParams

    rid, custom = f"line-{lineno}", False
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return rid, custom, None, None, f"line {lineno}: invalid JSON: {e}"
    if not isinstance(rec, dict):
        return rid, custom, None, None, f"line {lineno}: must be a JSON object"
    if "custom_id" in rec:
        rid, custom, body = rec["custom_id"], True, rec.get("body")
    else:
        rid, body = rec.get("id", rid), rec
    if not isinstance(rid, str) or not rid:
        return f"line-{lineno}", custom, None, None, f"id={rid!r}: must be a non-empty string"
    if not isinstance(body, dict):
        return rid, custom, None, None, "body: must be a JSON object"
    kw = dict(defaults)
    for key, field in SAMPLING_FIELDS.items():
        if key in body and body[key] is not None:
            kw[field] = body[key]
    if body.get("logprobs") is True:
        kw.setdefault("logprobs", 0)
    elif isinstance(body.get("logprobs"), int) and not isinstance(body.get("logprobs"), bool):
        kw["logprobs"] = body["logprobs"]
    try:
        sp = SamplingParams(**kw)
        if tokenizer is None and ("messages" in body or isinstance(body.get("prompt"), str)):
            raise ValueError("prompt: text needs a tokenizer; give token ids")
        if "messages" in body:
            if tokenizer is None:
                raise ValueError("messages: no tokenizer")
            prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
            ids = tokenizer.encode(prompt)
        elif isinstance(body.get("prompt"), str):
            ids = tokenizer.encode(body["prompt"])
        elif isinstance(body.get("prompt"), list) and all(
                isinstance(t, int) for t in body["prompt"]):
            ids = list(body["prompt"])
        else:
            raise ValueError("prompt: missing (give \"prompt\" or \"messages\")")
    except (ValueError, TypeError) as e:
        return rid, custom, None, None, str(e)
    return rid, custom, ids, sp, None


class _Progress:
    def __init__(self, total: int, stream: TextIO | None):
        self.total, self.stream = total, stream
        self.done = self.tokens = 0
        self.start = self._last = time.monotonic()

    def tick(self, new_tokens: int) -> None:
        self.tokens += new_tokens
        now = time.monotonic()
        if self.stream is not None and (now - self._last > 0.25 or self.done == self.total):
            self._last = now
            rate = self.tokens / max(now - self.start, 1e-9)
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/"
                              f"{self.total} requests, {self.tokens} tokens, {rate:.1f} tok/s")
            self.stream.flush()


def _batch(llm: Any, args: argparse.Namespace, defaults: dict[str, Any]) -> int:
    from xlaserve.runtime.llm import PreparedRequest

    out_path = pathlib.Path(args.output)
    done = _done_ids(out_path)
    if out_path.exists() and out_path.stat().st_size:
        with out_path.open("rb") as f:
            f.seek(-1, 2)
            needs_newline = f.read(1) != b"\n"
    else:
        needs_newline = False
    out = out_path.open("a", encoding="utf-8")
    if needs_newline:
        out.write("\n")  # finish a line cut short by a killed run; it is ignored when resuming

    def write(rec: dict[str, Any]) -> None:
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    reqs: list[PreparedRequest] = []
    meta: dict[str, _Line] = {}
    seen: set[str] = set()
    errors = skipped = 0
    with open(args.input, encoding="utf-8", errors="replace") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue
            rid, custom, ids, sp, err = parse_line(text, lineno, defaults, llm.tokenizer)
            if rid in done:
                skipped += 1
                continue
            if err is None and rid in seen:
                err = f"id={rid!r}: duplicate id in the input"
            if err is not None:
                errors += 1
                write({"id": rid, "error": err, "line": lineno})
                done.add(rid)
                continue
            seen.add(rid)
            key = f"job-{len(reqs)}"
            meta[key] = _Line(lineno, rid, custom)
            reqs.append(PreparedRequest(key, ids, sp))  # type: ignore[arg-type]
    progress = _Progress(len(reqs), None if args.no_progress else sys.stderr)

    def on_error(r: PreparedRequest, e: ValueError) -> None:
        nonlocal errors
        errors += 1
        m = meta[r.request_id]
        write({"id": m.id, "error": str(e), "line": m.lineno})
        progress.done += 1

    ttft, latency, out_tokens, prompt_tokens = [], [], 0, 0
    start = time.monotonic()
    try:
        for gen in llm.stream(reqs, on_step=progress.tick, on_error=on_error):
            m = meta[gen.request_id]
            rec = _result(gen, m)
            write(rec)
            progress.done += 1
            out_tokens += rec["usage"]["completion_tokens"]
            prompt_tokens += rec["usage"]["prompt_tokens"]
            if rec["timings"]["ttft_s"] is not None:
                ttft.append(rec["timings"]["ttft_s"])
            latency.append(rec["timings"]["latency_s"])
    finally:
        out.close()
    elapsed = time.monotonic() - start
    if not args.no_progress:
        progress.tick(0)
        sys.stderr.write("\n")
    _summary(len(latency), errors, skipped, prompt_tokens, out_tokens, elapsed, ttft, latency)
    return 0


def _result(gen: Any, m: _Line) -> dict[str, Any]:
    first = gen.outputs[0]
    rec: dict[str, Any] = {
        "id": m.id, "text": first.text, "token_ids": first.token_ids,
        "finish_reason": first.finish_reason, "usage": _usage(gen),
        "timings": {"ttft_s": first.ttft_s, "latency_s": max(c.latency_s or 0.0
                                                            for c in gen.outputs)}}
    if first.stop_reason is not None:
        rec["stop_reason"] = first.stop_reason
    if len(gen.outputs) > 1:
        rec["choices"] = [{"index": i, "text": c.text, "token_ids": c.token_ids,
                           "finish_reason": c.finish_reason} for i, c in enumerate(gen.outputs)]
    if first.logprobs:
        rec["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob,
                            "top": [list(t) for t in lp.top]} for lp in first.logprobs]
    if m.custom:
        rec["custom_id"] = m.id
    return rec


def _pcts(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    p = np.percentile(np.asarray(xs), [50, 90, 99])
    return f"p50 {p[0] * 1e3:.1f} ms, p90 {p[1] * 1e3:.1f} ms, p99 {p[2] * 1e3:.1f} ms"


def _summary(ok: int, errors: int, skipped: int, prompt_tokens: int, out_tokens: int,
             elapsed: float, ttft: list[float], latency: list[float]) -> None:
    lines = [
        f"requests: {ok} done, {errors} errors, {skipped} skipped (already in --output)",
        f"tokens: {prompt_tokens} prompt, {out_tokens} generated in {elapsed:.2f} s "
        f"({out_tokens / max(elapsed, 1e-9):.1f} tok/s, {ok / max(elapsed, 1e-9):.2f} req/s)",
        f"TTFT: {_pcts(ttft)}",
        f"latency: {_pcts(latency)}",
    ]
    sys.stderr.write("\n".join(lines) + "\n")

