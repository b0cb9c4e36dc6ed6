"""Peer baseline: the same model shape through Hugging Face transformers on the same GPU.

Two modes: eager (dynamic KV cache) and static KV cache with torch.compile. Random bf16 weights of
the shape in --config (no download). Reports batch-1 decode ms/token and offline output tokens/s
for (batch, input length, output length) cases, as JSON.

  python bench/peers.py --config bench/configs/llama3.1-8b --out $OUT/peers.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def build_model(config_dir: pathlib.Path):
    import torch
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(config_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    return model, cfg


def time_generate(model, batch: int, in_len: int, out_len: int, vocab: int,
                  static: bool) -> dict:
    """Greedy generation of exactly out_len tokens per row; returns timings."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(in_len * 131 + batch)
    ids = torch.randint(10, vocab - 10, (batch, in_len), device="cuda", generator=g)
    kwargs = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                  pad_token_id=0, eos_token_id=None)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        # time to first token: a generate of one new token.
        _sync()
        t0 = time.perf_counter()
        model.generate(ids, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1})
        _sync()
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        _sync()
        total = time.perf_counter() - t0
    n_new = (out.shape[1] - in_len) * batch
    return {"batch": batch, "input_len": in_len, "output_len": out_len, "ttft_s": ttft,
            "total_s": total, "decode_ms_per_token": 1e3 * (total - ttft) / max(out_len - 1, 1),
            "output_tokens_per_s": n_new / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="bench/configs/llama3.1-8b")
    p.add_argument("--modes", nargs="+", default=["eager", "static_compile"],
                   choices=["eager", "static_compile"])
    p.add_argument("--cases", nargs="+", default=["1x1024x64", "32x128x128", "8x2048x128"],
                   help="BATCHxINPUTxOUTPUT")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    import transformers

    model, cfg = build_model(pathlib.Path(args.config))
    results: list[dict] = []
    report = {
        "bench": "peers", "peer": "huggingface-transformers",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "config": args.config,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "modes": {"eager": "dynamic KV cache, no compile",
                  "static_compile": "cache_implementation='static': generate() torch.compiles "
                                    "the decode forward itself (transformers' auto-compile, "
                                    "its default CompileConfig); prefill runs eager"},
        "results": results,
    }
    for mode in args.modes:
        static = mode == "static_compile"
        for case in args.cases:
            b, i, o = (int(x) for x in case.split("x"))
            t0 = time.perf_counter()
            # Warm-up / compile. The static cache is sized input + output, so the compiled decode
            # step only serves the timed run when the warm-up has the same output length.
            time_generate(model, b, i, o if static else min(o, 8), cfg.vocab_size, static)
            r = time_generate(model, b, i, o, cfg.vocab_size, static)
            r["mode"] = mode
            r["warmup_s"] = round(time.perf_counter() - t0 - r["total_s"] - r["ttft_s"], 2)
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.out:  # after every case: a run cut short keeps what it measured
                pathlib.Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
