"""`xlaserve generate`: single prompt, batch job (resume, malformed lines, summary), exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xlaserve.cli import main

FLAGS = ["--dtype", "float32", "--max-num-batched-tokens", "64", "--max-num-seqs", "16",
         "--max-model-len", "128", "--page-size", "8", "--num-pages", "96"]


def test_single_prompt_json(fast_engine, tiny_engine_parts, capsys):
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.llm import LLM
    from xlaserve.runtime.request import SamplingParams

    rc = main(["generate", *FLAGS, "--prompt", "Hello", "--max-tokens", "5", "--temperature",
               "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert fast_engine[0].scheduler.max_num_batched_tokens == 64
    # The flags reach the request: the offline API's greedy 5 tokens, not a sample (a rerun of
    # the CLI alone repeats a sample too: an unseeded request's seed comes from the engine seed).
    runner, tok, mcfg = tiny_engine_parts
    want = LLM(engine=Engine(fast_engine[0], runner, tokenizer=tok, model_config=mcfg)).generate(
        "Hello", SamplingParams(temperature=0.0, max_tokens=5))[0]
    assert (out["token_ids"], out["text"]) == (want.token_ids, want.text)
    assert out["finish_reason"] == want.finish_reason
    assert out["usage"]["completion_tokens"] == len(want.token_ids)
    rc = main(["generate", *FLAGS, "--prompt", "Hello", "--max-tokens", "5", "--temperature",
               "0", "--json"])
    assert json.loads(capsys.readouterr().out) == out  # greedy: same again


def test_bad_input_exits_2_naming_the_field(fast_engine, capsys, tmp_path):
    assert main(["generate", "--prompt", "x", "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path / "missing.jsonl"), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["generate", "--max-num-seqs", "0", "--prompt", "x"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert fast_engine == []  # nothing was loaded for bad input


def test_missing_input_exit_code_from_the_console(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xlaserve", "generate", "--input",
                           str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--input" in proc.stderr


LINES = [
    {"id": "a", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
    "{not json",
    {"id": "b", "prompt": "one two", "temperature": -3},
    {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
              "temperature": 0}},
    {"id": "d", "prompt": [5, 6, 7, 8], "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 3},
    {"id": "e", "prompt": "x " * 200},
    {"id": "a", "prompt": "duplicate"},
]


def write_input(path):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in LINES) + "\n")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_job_results_errors_and_summary(fast_engine, capsys, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    assert main(["generate", *FLAGS, "--input", str(inp), "--output", str(out)]) == 0
    recs = {r["id"]: r for r in read(out)}
    assert len(read(out)) == 7
    assert recs["a"]["finish_reason"] == "length" and len(recs["a"]["token_ids"]) == 6
    assert recs["a"]["usage"]["completion_tokens"] == 6 and recs["a"]["timings"]["latency_s"] > 0
    assert "JSON" in recs["line-2"]["error"]
    assert "temperature" in recs["b"]["error"]
    assert recs["c"]["custom_id"] == "c" and len(recs["c"]["token_ids"]) <= 4
    assert len(recs["d"]["choices"]) == 2 and recs["d"]["usage"]["completion_tokens"] == 6
    assert "max_model_len" in recs["e"]["error"]
    err = capsys.readouterr().err
    assert "4/4 requests" in err and "tok/s" in err  # the progress line
    assert "TTFT" in err and "p50" in err
    assert "3 done, 4 errors" in err


def test_resume_skips_done_ids_and_survives_a_cut_line(fast_engine, capsys, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    first = {"id": "a", "text": "earlier", "token_ids": [1], "finish_reason": "length"}
    out.write_text(json.dumps(first) + "\n" + '{"id": "c", "text": "cut sh')  # killed mid-write
    assert main(["generate", *FLAGS, "--input", str(inp), "--output", str(out),
                 "--no-progress"]) == 0
    lines = out.read_text().splitlines()
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            assert line.startswith('{"id": "c", "text": "cut sh')
    ids = [r["id"] for r in recs]
    assert ids.count("a") == 1 and recs[0] == first  # not redone
    assert "c" in ids and "d" in ids
    assert "2 skipped" in capsys.readouterr().err  # "a" twice (its duplicate line too)
    # A third run finds everything done.
    assert main(["generate", *FLAGS, "--input", str(inp), "--output", str(out),
                 "--no-progress"]) == 0
    assert out.read_text().splitlines() == lines
    assert "0 done" in capsys.readouterr().err


def test_engine_args_build_the_config():
    from xlaserve.cli import UsageError, build_parser
    from xlaserve.engine_args import engine_config_from_args

    args = build_parser().parse_args(["generate", "--prompt", "x", "--model", "/m",
                                      "--no-prefix-caching", "--page-size", "32",
                                      "--num-pages", "100", "--tensor-parallel-size", "2",
                                      "--max-num-seqs", "4", "--seed", "9",
                                      "--gpu-memory-utilization", "0.5"])
    cfg = engine_config_from_args(args)
    assert cfg.model == "/m" and cfg.seed == 9 and cfg.cache.page_size == 32
    assert cfg.cache.num_pages == 100 and not cfg.cache.enable_prefix_caching
    assert cfg.cache.gpu_memory_utilization == 0.5
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.scheduler.max_num_seqs == 4
    default = engine_config_from_args(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert default.model == "builtin:tiny" and default.cache.enable_prefix_caching
    bad = build_parser().parse_args(["generate", "--prompt", "x", "--page-size", "5"])
    with pytest.raises(UsageError, match="page_size"):
        engine_config_from_args(bad)
