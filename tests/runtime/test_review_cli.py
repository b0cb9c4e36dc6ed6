"""CLI review: bad flags exit 2 before loading; a bad batch line costs only itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from xlaserve.cli import main
from xlaserve.runtime.llm import LLM

FLAGS = ["--dtype", "float32", "--max-num-batched-tokens", "64", "--max-num-seqs", "16",
         "--max-model-len", "128", "--page-size", "8", "--num-pages", "96"]


def run_batch(tmp_path, lines, *extra):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if isinstance(lines, bytes):
        inp.write_bytes(lines)
    else:
        inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                               for x in lines), encoding="utf-8")
    rc = main(["generate", *FLAGS, "--input", str(inp), "--output", str(out), "--no-progress",
               *extra])
    return rc, [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ single prompt


def test_single_prompt_prints_every_one_of_n_samples(fast_engine, capsys):
    assert main(["generate", *FLAGS, "--prompt", "Hello", "--n", "3", "--max-tokens", "4",
                 "--seed", "1", "--ignore-eos", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["usage"]["completion_tokens"] == 12
    assert [len(c["token_ids"]) for c in rec["choices"]] == [4, 4, 4]
    assert rec["choices"][0]["token_ids"] == rec["token_ids"]
    assert len({tuple(c["token_ids"]) for c in rec["choices"]}) > 1  # sampled, seeded per sample
    assert main(["generate", *FLAGS, "--prompt", "Hello", "--n", "3", "--max-tokens", "4",
                 "--seed", "1", "--ignore-eos"]) == 0
    text = capsys.readouterr().out
    for c in rec["choices"]:
        assert c["text"] in text
    assert text.count("sample") == 3


def test_prompt_with_a_model_without_tokenizer_exits_2_before_loading(fast_engine, capsys,
                                                                       tmp_path):
    from xlaserve.checkpoints.loader import resolve_model_dir

    src = resolve_model_dir("builtin:tiny")
    model = tmp_path / "no_tokenizer"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, model / name)
    assert main(["generate", *FLAGS, "--model", str(model), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "tokenizer.json" in err and "--input" in err
    assert fast_engine == []  # refused before loading and compiling the model


# ------------------------------------------------------- engine flags checked before any loading


def test_attention_impl_unavailable_here_exits_2(fast_engine, capsys):
    assert main(["generate", *FLAGS, "--prompt", "x", "--attention-impl", "pallas_triton"]) == 2
    err = capsys.readouterr().err
    assert "--attention-impl='pallas_triton'" in err and "GPU" in err
    assert main(["generate", *FLAGS, "--prompt", "x", "--attention-impl", "bogus"]) == 2
    assert "--attention-impl='bogus'" in capsys.readouterr().err
    assert fast_engine == []


def test_decode_gemm_pallas_off_gpu_exits_2(fast_engine, capsys):
    assert main(["generate", *FLAGS, "--prompt", "x", "--decode-gemm", "pallas"]) == 2
    err = capsys.readouterr().err
    assert "--decode-gemm='pallas'" in err and "GPU" in err
    with pytest.raises(SystemExit) as e:  # not one of the choices: argparse's usage error
        main(["generate", *FLAGS, "--prompt", "x", "--decode-gemm", "cublas"])
    assert e.value.code == 2 and "--decode-gemm" in capsys.readouterr().err
    assert fast_engine == []


def test_unusable_compilation_cache_dir_exits_2(fast_engine, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = blocker / "cache"  # under a regular file: cannot be created
    assert main(["generate", *FLAGS, "--prompt", "x", "--compilation-cache-dir", str(bad)]) == 2
    assert "--compilation-cache-dir" in capsys.readouterr().err
    assert fast_engine == []


def test_profile_model_and_parallel_errors_exit_2(capsys, monkeypatch):
    from xlaserve.profiling import session

    def no_profile(*a, **k):
        raise AssertionError("profiled despite bad flags")
    monkeypatch.setattr(session, "profile", no_profile)
    assert main(["profile", "--model", "/no/such/model"]) == 2
    assert "/no/such/model" in capsys.readouterr().err
    assert main(["profile", "--tensor-parallel-size", "16"]) == 2  # 8 fake devices
    assert "tensor_parallel_size=16" in capsys.readouterr().err
    assert main(["profile", "--attention-impl", "pallas_triton"]) == 2
    assert "--attention-impl" in capsys.readouterr().err


def test_profile_checks_where_it_writes_before_profiling(capsys, monkeypatch, tmp_path):
    from xlaserve.profiling import session

    def no_profile(*a, **k):
        raise AssertionError("profiled despite an unwritable destination")
    monkeypatch.setattr(session, "profile", no_profile)
    missing = tmp_path / "missing_dir"
    assert main(["profile", "--json", str(missing / "r.json")]) == 2
    assert "--json" in capsys.readouterr().err
    assert main(["profile", "--plot", str(missing / "p.png")]) == 2
    assert "--plot" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(["profile", "--dump-hlo", str(tmp_path / "f" / "hlo")]) == 2
    assert "--dump-hlo" in capsys.readouterr().err


def test_serve_missing_model_exits_2_without_listening(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xlaserve", "serve", "--model",
                           str(tmp_path / "nope"), "--port", "0", "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "listening" not in proc.stdout and "Traceback" not in proc.stderr
    assert "nope" in proc.stderr


# -------------------------------------------------------------------------------- batch job


def test_batch_unknown_fields_are_errors_naming_them(fast_engine, tmp_path):
    rc, recs = run_batch(tmp_path, [
        {"id": "typo", "prompt": "hi", "max_token": 3},
        {"custom_id": "oa", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "hi", "max_tokens": 2, "functions": []}},
        {"custom_id": "ok", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "hi", "max_tokens": 2}},
    ])
    by_id = {r["id"]: r for r in recs}
    assert "max_token=3" in by_id["typo"]["error"] and "unknown" in by_id["typo"]["error"]
    assert "functions" in by_id["oa"]["error"]
    assert "error" not in by_id["ok"] and len(by_id["ok"]["token_ids"]) <= 2  # "model" is fine
    assert rc == 0


def test_batch_wrong_types_name_the_field(fast_engine, tmp_path):
    _, recs = run_batch(tmp_path, [
        {"id": "mt", "prompt": "hi", "max_tokens": "5"},
        {"id": "stop", "prompt": "hi", "stop": 5},
        {"id": "p", "prompt": 123},
        {"id": "bools", "prompt": [True, 5]},
        {"id": "eos", "prompt": "hi", "ignore_eos": "false"},
        {"id": "lp", "prompt": "hi", "logprobs": "yes"},
        {"id": "inc", "prompt": "hi", "include_stop_str_in_output": "yes"},
        {"id": "good", "prompt": "hi", "max_tokens": 2},
        {"id": "inc_ok", "prompt": "hi", "max_tokens": 2, "stop": ["x"],
         "include_stop_str_in_output": True},
    ])
    by_id = {r["id"]: r for r in recs}
    assert "max_tokens='5'" in by_id["mt"]["error"]
    assert "stop=5" in by_id["stop"]["error"]
    assert "prompt=123" in by_id["p"]["error"]
    assert "prompt=" in by_id["bools"]["error"]
    assert "ignore_eos='false'" in by_id["eos"]["error"]
    assert "logprobs='yes'" in by_id["lp"]["error"]
    assert "include_stop_str_in_output='yes'" in by_id["inc"]["error"]
    assert "error" not in by_id["good"] and "error" not in by_id["inc_ok"]


def test_batch_invalid_utf8_line_is_an_error_and_a_bom_is_fine(fast_engine, tmp_path):
    data = ("\ufeff" + json.dumps({"id": "first", "prompt": "hi", "max_tokens": 2}) + "\n"
            ).encode("utf-8")
    data += b'{"id": "bad", "prompt": "caf\xe9", "max_tokens": 2}\n'
    data += (json.dumps({"id": "uni", "prompt": "h\u00e9llo \u4e16\u754c", "max_tokens": 2},
                        ensure_ascii=False) + "\n").encode("utf-8")
    _, recs = run_batch(tmp_path, data)
    by_id = {r["id"]: r for r in recs}
    assert "error" not in by_id["first"]
    assert "UTF-8" in by_id["bad"]["error"] and by_id["bad"]["line"] == 2
    assert "error" not in by_id["uni"]


def test_batch_lone_surrogate_costs_only_its_line(fast_engine, tmp_path):
    _, recs = run_batch(tmp_path, [
        {"id": "a", "prompt": "hi", "max_tokens": 2},
        '{"id": "\\ud800", "prompt": "x", "max_tokens": 2}',
        '{"id": "s", "prompt": "bad \\udc00 text", "max_tokens": 2}',
        {"id": "b", "prompt": "yo", "max_tokens": 2},
    ])
    by_line = {r.get("line"): r for r in recs}
    assert "surrogate" in by_line[2]["error"] and "surrogate" in by_line[3]["error"]
    ok = {r["id"] for r in recs if "error" not in r}
    assert ok == {"a", "b"}


def test_batch_duplicate_id_does_not_hide_the_first_line_when_resumed(fast_engine, tmp_path,
                                                                     monkeypatch):
    lines = [{"id": "x", "prompt": "hi", "max_tokens": 2},
             {"id": "x", "prompt": "again", "max_tokens": 2}]
    real_stream = LLM.stream

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt  # Ctrl-C before the first result
        yield
    monkeypatch.setattr(LLM, "stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(tmp_path, lines)
    monkeypatch.setattr(LLM, "stream", real_stream)
    rc, recs = run_batch(tmp_path, lines)  # resume
    assert rc == 0
    done = [r for r in recs if "error" not in r]
    assert [r["id"] for r in done] == ["x"]  # line 1 ran; only line 2 is the duplicate
    assert [r["line"] for r in recs if "error" in r] == [2]


def test_batch_output_must_not_be_the_input(fast_engine, capsys, tmp_path):
    inp = tmp_path / "in.jsonl"
    original = json.dumps({"id": "a", "prompt": "hi", "max_tokens": 2}) + "\n{bad\n"
    inp.write_text(original)
    assert main(["generate", *FLAGS, "--input", str(inp), "--output", str(inp)]) == 2
    assert "--output" in capsys.readouterr().err
    assert inp.read_text() == original
    assert main(["generate", *FLAGS, "--input", str(inp), "--output", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err
    assert fast_engine == []


# -------------------------------------------------------------------------------- profile


def test_profile_on_cpu_says_what_is_not_available(capsys):
    rc = main(["profile", "--dtype", "float32", "--max-num-batched-tokens", "16",
               "--max-num-seqs", "8", "--max-model-len", "64", "--page-size", "8",
               "--num-pages", "32", "--no-penalty-programs", "--json", "-"])
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    notes = " ".join(report["not_available"])
    assert "pallas_triton" in notes and "reference" in notes  # attention fell back, said so
    assert "nominal" in notes and "--calibrate" in notes  # the peaks are not this machine's
    assert "memory" in notes
    assert "Not available" in captured.err and "pallas_triton" in captured.err


def test_convert_output_that_is_a_file_exits_2(capsys, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("")
    assert main(["convert", "--model", "builtin:tiny", "--output", str(target)]) == 2
    assert "--output" in capsys.readouterr().err


def test_batch_logit_bias_forces_and_bans_tokens(fast_engine, tmp_path):
    """OpenAI's logit_bias (token ids as string keys): +100 forces a token at every step, and
    a line without one in the same batch is unchanged; bad values are error records."""
    plain = {"id": "plain", "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0,
             "ignore_eos": True}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, solo = run_batch(tmp_path / "a", [plain])
    first = solo[0]["token_ids"][0]
    bad = {  # id -> (logit_bias, what its error record says)
        "key": ({"x": 1}, "key 'x' is not a token id"),
        "range": ({"5": 101}, "bias 101 for token 5"),
        "vocab": ({"100000": 1}, "logit_bias: token ids must be in [0, "),
        "type": ([5, 1], "logit_bias=[5, 1]: must be an object"),
        "super": ({"\u00b2": 1}, "logit_bias: key '²' is not a token id"),
        "arabic": ({"\u0661": 1}, "logit_bias: key '١' is not a token id"),
        "twice": ({"5": 1, "05": -100}, "logit_bias: token id 5 appears twice ('05')"),
    }
    _, recs = run_batch(tmp_path / "b", [
        {**plain, "id": "forced", "logit_bias": {"97": 100}},
        {"custom_id": "banned", "method": "POST", "url": "/v1/completions",
         "body": {**{k: v for k, v in plain.items() if k != "id"}, "max_tokens": 1,
                  "logit_bias": {str(first): -100}}},
        plain,
        *({"id": rid, "prompt": "hi", "logit_bias": lb} for rid, (lb, _) in bad.items()),
    ])
    by_id = {r["id"]: r for r in recs}
    assert by_id["forced"]["token_ids"] == [97] * 6
    assert by_id["banned"]["token_ids"][0] != first
    assert by_id["plain"]["token_ids"] == solo[0]["token_ids"]
    for rid, (_, says) in bad.items():
        assert says in by_id[rid]["error"], (rid, by_id[rid])
