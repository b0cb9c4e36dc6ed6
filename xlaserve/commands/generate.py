"""`xlaserve generate`: one prompt, or a JSONL batch job.

Single prompt:  xlaserve generate [--model M] --prompt TEXT [--max-tokens N] [--temperature T]
                [--seed S] [--json]
Batch job:      xlaserve generate --model M --input prompts.jsonl --output results.jsonl [...]

Batch input lines: {"id", "prompt" | "messages", optional sampling fields} or the OpenAI batch
format {"custom_id", "body": {"prompt" | "messages", sampling fields}}. Each result is appended
to --output as one JSON line as soon as it finishes (id, text, token_ids, finish_reason, usage,
timings); a re-run with the same --output skips the ids already there, so a killed job loses
nothing it wrote. A malformed line (invalid JSON or UTF-8, an unknown field, a value of the wrong
type or range) gets its own result line with "error", its id and "line", and never stops the job.
Progress (tokens/s) and a summary (throughput, TTFT and latency percentiles) go to stderr.

Exit codes: 0 when the job ran to the end, even if some lines got an "error" record (the summary
counts them; so does `grep '"error"'`), 2 for bad flags or an unusable --input/--output (checked
before the model loads), 1 for a failure at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, TextIO

import numpy as np

from xlaserve.cli import UsageError
from xlaserve.engine_args import add_engine_args, check_engine_config, engine_config_from_args

# Per-line sampling fields (OpenAI names accepted too) -> SamplingParams field.
SAMPLING_FIELDS = {
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
    "min_tokens": "min_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "seed": "seed", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "n": "n", "top_logprobs": "logprobs",
    "include_stop_str_in_output": "include_stop_str_in_output", "logit_bias": "logit_bias",
}
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "min_tokens", "top_k", "seed", "n",
               "top_logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
# Other keys a line (or an OpenAI "body") may hold. "model" and "user" are accepted and ignored
# (the job runs one model); any other key is an error, so that a typo such as "max_token" is not
# silently dropped.
_LINE_KEYS = ("prompt", "messages", "logprobs", "model", "user")
_OPENAI_KEYS = ("custom_id", "method", "url", "body")
_EXIT_CODES = ("exit codes: 0 the job ran to the end (lines that failed have an \"error\" record "
               "in --output), 2 bad flags or an unusable --input/--output, 1 a failure at run time")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = _EXIT_CODES
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
    s.add_argument("--include-stop-str-in-output", action="store_true", default=None,
                   help="keep a matched stop string at the end of the text")


def _sampling_defaults(args: argparse.Namespace) -> dict[str, Any]:
    from xlaserve.runtime.request import SamplingParams

    names = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
             "repetition_penalty", "presence_penalty", "frequency_penalty", "stop", "n",
             "ignore_eos", "include_stop_str_in_output")
    out = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    try:
        SamplingParams(**out)
    except ValueError as e:
        field, _, rest = str(e).partition("=")
        raise UsageError(f"--{field.replace('_', '-')}={rest}") from e
    return out


def _check_files(args: argparse.Namespace) -> None:
    """--input readable, --output writable and not the input: before the model loads."""
    inp, out = pathlib.Path(args.input), pathlib.Path(args.output)
    if not inp.is_file():
        raise UsageError(f"--input={args.input!r}: no such file")
    if not os.access(inp, os.R_OK):
        raise UsageError(f"--input={args.input!r}: not readable")
    if out.is_dir():
        raise UsageError(f"--output={args.output!r}: is a directory")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--output={args.output!r}: its directory does not exist")
    if out.exists() and os.path.samefile(inp, out):
        raise UsageError(f"--output={args.output!r}: is the --input file (results are appended "
                         "to --output)")
    if not os.access(out if out.exists() else out.absolute().parent, os.W_OK):
        raise UsageError(f"--output={args.output!r}: not writable")


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input is None):
        raise UsageError("give exactly one of --prompt or --input")
    if args.input is not None:
        if not args.output:
            raise UsageError("--output: required with --input")
        _check_files(args)
    defaults = _sampling_defaults(args)
    cfg = engine_config_from_args(args)
    model_dir = check_engine_config(cfg)
    if args.prompt is not None and not (model_dir / "tokenizer.json").is_file():
        raise UsageError(f"--model={cfg.model!r}: {str(model_dir)!r} has no tokenizer.json, so "
                         "--prompt text cannot be tokenized; give token ids through --input "
                         "(lines like {\"prompt\": [1, 2, 3]})")
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
        rec: dict[str, Any] = {"text": out.text, "token_ids": out.token_ids,
                               "finish_reason": out.finish_reason, "usage": _usage(out)}
        if out.outputs[0].stop_reason is not None:
            rec["stop_reason"] = out.outputs[0].stop_reason
        if len(out.outputs) > 1:  # --n: every sample, as in the batch job's records
            rec["choices"] = _choices(out)
        print(json.dumps(rec))
    elif len(out.outputs) == 1:
        print(out.text)
    else:
        for i, c in enumerate(out.outputs):
            print(f"--- sample {i} ---\n{c.text}")
    return 0


def _choices(gen: Any) -> list[dict[str, Any]]:
    return [{"index": i, "text": c.text, "token_ids": c.token_ids,
             "finish_reason": c.finish_reason} for i, c in enumerate(gen.outputs)]


def _usage(gen: Any) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in gen.outputs)
    prompt = len(gen.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "cached_tokens": gen.outputs[0].num_cached_tokens}


def _done(path: pathlib.Path) -> tuple[set[str], set[tuple[str, int | None]]]:
    """What an earlier run wrote: ids with a result, and (id, line) of its error records.

    An error record stands for its own line only: the record of a duplicate id must not make a
    resumed job skip the first line with that id, whose result may never have been written.
    """
    done: set[str] = set()
    failed: set[tuple[str, int | None]] = set()
    if not path.exists():
        return done, failed
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when a previous run was killed
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                continue
            if "error" in rec:
                lineno = rec.get("line")
                failed.add((rec["id"], lineno if isinstance(lineno, int) else None))
            else:
                done.add(rec["id"])
    return done, failed


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
    from xlaserve.runtime.request import SamplingParams, logit_bias_from_json

    rid, custom = f"line-{lineno}", False
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return rid, custom, None, None, f"line {lineno}: invalid JSON: {e}"
    if not isinstance(rec, dict):
        return rid, custom, None, None, f"line {lineno}: must be a JSON object"
    try:  # JSON may spell lone UTF-16 surrogates ("\ud800"), which are no text
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return rid, custom, None, None, (f"line {lineno}: not valid Unicode: a lone surrogate "
                                         f"{ascii(e.object[e.start:e.end])}")
    if "custom_id" in rec:
        rid, custom, body = rec["custom_id"], True, rec.get("body")
    else:
        rid, body = rec.get("id", rid), rec
    if not isinstance(rid, str) or not rid:
        return f"line-{lineno}", custom, None, None, f"id={rid!r}: must be a non-empty string"
    if not isinstance(body, dict):
        return rid, custom, None, None, "body: must be a JSON object"
    known = set(SAMPLING_FIELDS) | set(_LINE_KEYS) | (set() if custom else {"id"})
    unknown = [(k, v) for k, v in body.items() if k not in known]
    unknown += [(k, v) for k, v in rec.items() if custom and k not in _OPENAI_KEYS]
    if unknown:
        key, value = unknown[0]
        return rid, custom, None, None, (f"{key}={_short(value)}: unknown field (known: "
                                         f"{', '.join(sorted(known))})")
    kw = dict(defaults)
    try:
        for key, field in SAMPLING_FIELDS.items():
            if key in body and body[key] is not None:
                _check_type(key, body[key])
                kw[field] = (logit_bias_from_json(body[key]) if key == "logit_bias"
                             else body[key])
        logprobs = body.get("logprobs")
        if logprobs is True:
            kw.setdefault("logprobs", 0)
        elif isinstance(logprobs, int) and not isinstance(logprobs, bool):
            kw["logprobs"] = logprobs
        elif logprobs not in (None, False):
            raise ValueError(f"logprobs={_short(logprobs)}: must be true, false or an integer")
        sp = SamplingParams(**kw)
        prompt = body.get("prompt")
        if "messages" in body and prompt is not None:
            raise ValueError("prompt, messages: give one of them, not both")
        no_tokenizer = "prompt: text needs a tokenizer; give token ids"
        if "messages" in body:
            if tokenizer is None:
                raise ValueError(no_tokenizer)
            text_prompt = tokenizer.apply_chat_template(body["messages"],
                                                        add_generation_prompt=True)
            ids = tokenizer.encode(text_prompt)
        elif isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(no_tokenizer)
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        elif prompt is not None:
            raise ValueError(f"prompt={_short(prompt)}: must be a string or a list of token ids")
        else:
            raise ValueError("prompt: missing (give \"prompt\" or \"messages\")")
    except (ValueError, TypeError) as e:
        return rid, custom, None, None, str(e)
    return rid, custom, ids, sp, None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_type(key: str, value: Any) -> None:
    """Raises ValueError naming `key` when a sampling field has the wrong JSON type."""
    if key in _INT_FIELDS:
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif key in _FLOAT_FIELDS:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif key == "stop":
        ok = isinstance(value, str) or (isinstance(value, list) and
                                        all(isinstance(x, str) for x in value))
        want = "a string or a list of strings"
    elif key == "stop_token_ids":
        ok, want = isinstance(value, list), "a list of token ids"
    elif key in ("ignore_eos", "include_stop_str_in_output"):
        ok, want = isinstance(value, bool), "true or false"
    else:
        return
    if not ok:
        raise ValueError(f"{key}={_short(value)}: must be {want}")


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
    done, failed = _done(out_path)
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
        line = json.dumps(rec, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: \u-escaped, still one valid JSON line
            line = json.dumps(rec)
        out.write(line + "\n")
        out.flush()

    reqs: list[PreparedRequest] = []
    meta: dict[str, _Line] = {}
    seen: set[str] = set()
    errors = skipped = 0
    with open(args.input, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            bad_utf8 = None
            try:  # a BOM (Windows editors) on the first line is no error
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace")  # only to find the line's id
                bad_utf8 = f"line {lineno}: not valid UTF-8 (byte {e.start})"
            if not text.strip():
                continue
            rid, custom, ids, sp, err = parse_line(text, lineno, defaults, llm.tokenizer)
            if rid in done or (rid, lineno) in failed or (rid, None) in failed:
                skipped += 1
                continue
            err = bad_utf8 or err
            if err is None and rid in seen:
                err = f"id={rid!r}: duplicate id in the input"
            seen.add(rid)
            if err is not None:
                errors += 1
                write({"id": rid, "error": err, "line": lineno})
                continue
            if ids is None or sp is None:  # parse_line gives both whenever it gives no error
                raise RuntimeError(f"line {lineno}: parse_line returned neither a request nor "
                                   f"an error")
            key = f"job-{len(reqs)}"
            meta[key] = _Line(lineno, rid, custom)
            reqs.append(PreparedRequest(key, ids, sp))
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
        rec["choices"] = _choices(gen)
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

