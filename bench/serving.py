"""Online serving benchmark: an asyncio gRPC load generator over the native ``xlaserve.v1``
Generate streaming RPC, with Poisson arrivals at several request rates and a closed-loop
concurrency sweep.

Per load level: TTFT, time per output token (TPOT = (end-to-end - TTFT) / (output tokens - 1)),
inter-token latency (ITL: gaps between streamed responses that carry tokens) and end-to-end
latency at p50/p90/p99; request and output-token throughput; goodput (requests/s meeting every
SLO given by --slo-ttft-ms / --slo-tpot-ms / --slo-e2e-ms). A PNG plots latency and throughput
against load and marks the saturation point (concurrency sweep: the smallest concurrency reaching
90% of the best throughput; rate sweep: the first rate whose achieved request rate falls below
90% of the offered one).

Requests: random token-id prompts (fixed seed, never repeated, so no prefix-cache hits), greedy,
ignore_eos, max_tokens = output length. By default the script starts the server itself in a
child process (``serving.py serve`` with the engine flags; tokenizer-less engine from
e2e_common.build_engine) so that the client does not share the server's GIL; --target uses a
running server instead. Engine stats (compiles_after_warmup) come from the child at shutdown.

The client is one Python process: at many thousand streamed tokens per second its own CPU time
can become the limit; `client_cpu_s` in the JSON shows how busy it was.

  python bench/serving.py --out $OUT/serving.json --plot $OUT/serving.png
  python bench/serving.py --target 127.0.0.1:50051 --rates 1 4 16 --concurrency 1 8 32
  python bench/serving.py --model builtin:tiny --input-len 16 --output-len 8 --rates 20 \
      --concurrency 1 4 --num-prompts 8 --max-num-seqs 8 --max-num-batched-tokens 64 \
      --token-buckets 64 --seq-buckets 8                                 # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

import e2e_common as ec

MODEL_NAME = "bench"


# ------------------------------------------------------------------------------- server (child)


def serve_main(args: argparse.Namespace) -> int:
    """Builds the engine in the server's engine thread and serves until SIGTERM."""
    from xlaserve.serve.grpc_server import ServerOptions, serve_until_signal

    holder: dict[str, Any] = {}

    def factory() -> Any:
        built = ec.build_engine(args, max_model_len=args.max_model_len or 4096)
        holder["built"] = built
        return built.engine

    opts = ServerOptions(model_name=MODEL_NAME, host=args.host, port=args.port,
                         metrics_port=None, max_in_flight=args.max_in_flight,
                         drain_timeout_s=5.0)
    rc = asyncio.run(serve_until_signal(factory, opts))
    built = holder.get("built")
    if args.stats_out and built is not None:
        stats = built.engine.stats()
        pathlib.Path(args.stats_out).write_text(json.dumps({
            "metadata": ec.run_metadata("serving-server"),
            **ec.compile_report(built),
            "num_preemptions": int(stats.num_preemptions), "num_steps": int(stats.num_steps),
            "engine": ec.engine_summary(built), "host_gaps": built.timed.idle_summary(),
        }, default=str))
    return rc


# ------------------------------------------------------------------------------- load generator


async def one_request(stub: Any, prompt: list[int], out_len: int, rid: str,
                      timeout_s: float) -> dict[str, Any]:
    """Sends one streaming Generate; returns its timestamps (perf_counter seconds)."""
    import grpc

    from xlaserve.serve.client import build_generate_request

    req = build_generate_request(token_ids=prompt, request_id=rid, stream=True,
                                 max_tokens=out_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    times: list[float] = []
    n_tokens = 0
    error = None
    try:
        async for resp in stub.Generate(req, timeout=timeout_s):
            k = len(resp.delta.token_ids)
            if k:
                times.append(time.perf_counter())
                n_tokens += k
    except grpc.RpcError as e:  # grpc.aio raises AioRpcError, a subclass
        error = f"{e.code().name}: {e.details()}"
    if error is None and n_tokens != out_len:
        error = f"{n_tokens} tokens, expected {out_len}"
    return {"start": t0, "times": times, "n_tokens": n_tokens, "input_len": len(prompt),
            "error": error}


def summarize(results: list[dict[str, Any]], slo: dict[str, float | None]) -> dict[str, Any]:
    """Latency percentiles, throughput and goodput of one load level."""
    ok = [r for r in results if r["error"] is None and r["times"]]
    start = min(r["start"] for r in results)
    end = max((r["times"][-1] for r in ok), default=start)
    dur = max(end - start, 1e-9)
    ttft = [r["times"][0] - r["start"] for r in ok]
    e2e = [r["times"][-1] - r["start"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["n_tokens"] - 1) for r in ok
            if r["n_tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    good = 0
    for r in ok:
        t, e = r["times"][0] - r["start"], r["times"][-1] - r["start"]
        p = (r["times"][-1] - r["times"][0]) / (r["n_tokens"] - 1) if r["n_tokens"] > 1 else 0.0
        if ((slo["ttft_ms"] is None or 1e3 * t <= slo["ttft_ms"])
                and (slo["tpot_ms"] is None or 1e3 * p <= slo["tpot_ms"])
                and (slo["e2e_ms"] is None or 1e3 * e <= slo["e2e_ms"])):
            good += 1
    out_tok = sum(r["n_tokens"] for r in ok)
    errors = [r["error"] for r in results if r["error"] is not None]
    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(errors),
        "errors_sample": errors[:5], "duration_s": dur,
        "requests_per_s": len(ok) / dur, "output_tokens_per_s": out_tok / dur,
        "total_tokens_per_s": (out_tok + sum(r["input_len"] for r in ok)) / dur,
        "goodput_requests_per_s": good / dur, "goodput_fraction": good / max(len(results), 1),
        "ttft_ms": ec.percentiles(ttft, 1e3), "tpot_ms": ec.percentiles(tpot, 1e3),
        "itl_ms": ec.percentiles(itl, 1e3), "e2e_ms": ec.percentiles(e2e, 1e3),
    }


async def run_poisson(stub: Any, prompts: list[tuple[list[int], int]], rate: float,
                      rng: np.random.Generator, timeout_s: float, tag: str) -> list[dict]:
    """Sends every prompt at Poisson arrival times of `rate` req/s (inf: all at once)."""
    tasks = []
    t_next = time.perf_counter()
    for i, (prompt, out_len) in enumerate(prompts):
        if math.isfinite(rate):
            t_next += float(rng.exponential(1.0 / rate))
            delay = t_next - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(
            one_request(stub, prompt, out_len, f"{tag}-{i}", timeout_s)))
    return list(await asyncio.gather(*tasks))


async def run_concurrency(stub: Any, prompts: list[tuple[list[int], int]], concurrency: int,
                          timeout_s: float, tag: str) -> list[dict]:
    """Closed loop: `concurrency` workers, each sending its next prompt when the last ends."""
    queue = list(enumerate(prompts))
    results: list[dict] = []

    async def worker() -> None:
        while queue:
            i, (prompt, out_len) = queue.pop(0)
            results.append(await one_request(stub, prompt, out_len, f"{tag}-{i}", timeout_s))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def wait_serving(target: str, timeout_s: float, child: subprocess.Popen | None) -> None:
    """Polls grpc.health.v1 until SERVING (raises if the child exits or time runs out)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                raise RuntimeError(f"server exited with {child.returncode} before serving")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"{target}: not SERVING after {timeout_s:.0f}s")


def make_prompts(args: argparse.Namespace, n: int, rng: np.random.Generator, vocab: int
                 ) -> list[tuple[list[int], int]]:
    if args.sharegpt:
        lengths = ec.sharegpt_lengths(n, int(rng.integers(1 << 30)))
    else:
        lengths = ((args.input_len, args.output_len),) * n
    return [(ec.random_prompt(rng, i, vocab), o) for i, o in lengths]


async def load_main(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """Runs the warm-up, the rate sweep and the concurrency sweep against `target`."""
    import grpc

    from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub, protos

    slo = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms, "e2e_ms": args.slo_e2e_ms}
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"slo": slo, "rate_sweep": [], "concurrency_sweep": []}
    opts = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        stub = Stub(ch, NATIVE_SERVICE)
        info = await stub.GetModelInfo(protos().native.GetModelInfoRequest(), timeout=30)
        vocab = int(info.vocab_size)
        out["server_model_info"] = {"context_length": info.context_length,
                                    "token_buckets": list(info.token_buckets),
                                    "seq_buckets": list(info.seq_buckets),
                                    "max_num_seqs": info.max_num_seqs,
                                    "num_pages": info.num_pages, "page_size": info.page_size}
        warm = make_prompts(args, args.warmup_prompts, rng, vocab)
        await run_concurrency(stub, [(p, min(o, 4)) for p, o in warm], len(warm) or 1,
                              args.request_timeout_s, "warm")
        for rate in args.rates:
            prompts = make_prompts(args, args.num_prompts, rng, vocab)
            cpu0 = time.process_time()
            res = await run_poisson(stub, prompts, rate, rng, args.request_timeout_s,
                                    f"rate{rate}")
            level = {"request_rate": rate if math.isfinite(rate) else "inf",
                     **summarize(res, slo), "client_cpu_s": time.process_time() - cpu0}
            out["rate_sweep"].append(level)
            _print_level(f"rate {rate:g}/s", level)
        for c in args.concurrency:
            n = max(args.num_prompts, 2 * c)
            prompts = make_prompts(args, n, rng, vocab)
            cpu0 = time.process_time()
            res = await run_concurrency(stub, prompts, c, args.request_timeout_s, f"conc{c}")
            level = {"concurrency": c, **summarize(res, slo),
                     "client_cpu_s": time.process_time() - cpu0}
            out["concurrency_sweep"].append(level)
            _print_level(f"concurrency {c}", level)
    out["saturation"] = saturation(out)
    return out


def _print_level(name: str, lv: dict[str, Any]) -> None:
    print(f"{name:>18}: {lv['requests_per_s']:.2f} req/s, {lv['output_tokens_per_s']:.0f} "
          f"out tok/s, TTFT p50/p99 {ec.fmt(lv['ttft_ms']['p50'], 1)}/"
          f"{ec.fmt(lv['ttft_ms']['p99'], 1)} ms, TPOT p50 {ec.fmt(lv['tpot_ms']['p50'])} ms, "
          f"goodput {lv['goodput_requests_per_s']:.2f} req/s, failed {lv['failed']}", flush=True)


def saturation(out: dict[str, Any]) -> dict[str, Any]:
    """Where throughput stops growing with load (see the module docstring)."""
    res: dict[str, Any] = {}
    conc = out["concurrency_sweep"]
    if conc:
        best = max(lv["output_tokens_per_s"] for lv in conc)
        knee = next(lv for lv in conc if lv["output_tokens_per_s"] >= 0.9 * best)
        res["concurrency"] = {"knee_concurrency": knee["concurrency"],
                              "max_output_tokens_per_s": best,
                              "rule": ">= 90% of the best output tokens/s"}
    rates = [lv for lv in out["rate_sweep"] if lv["request_rate"] != "inf"]
    if rates:
        sat = next((lv for lv in rates if lv["requests_per_s"] < 0.9 * lv["request_rate"]), None)
        res["rate"] = {"saturating_rate": sat["request_rate"] if sat else None,
                       "rule": "first rate whose achieved req/s < 90% of offered"}
    return res


def plot(out: dict[str, Any], path: str) -> None:
    """Latency (log scale) and throughput against load, saturation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [(k, x) for k, x in (("concurrency_sweep", "concurrency"),
                                  ("rate_sweep", "request_rate")) if out[k]]
    fig, axes = plt.subplots(len(sweeps) or 1, 2, figsize=(12, 4.5 * max(len(sweeps), 1)),
                             squeeze=False)
    for row, (key, xname) in enumerate(sweeps):
        levels = [lv for lv in out[key] if lv[xname] != "inf"]
        xs = [float(lv[xname]) for lv in levels]
        ax = axes[row][0]
        for metric, style in (("ttft_ms", "o-"), ("tpot_ms", "s-"), ("e2e_ms", "^-")):
            for q, alpha in (("p50", 1.0), ("p99", 0.5)):
                ys = [lv[metric][q] for lv in levels]
                ax.plot(xs, ys, style, alpha=alpha, label=f"{metric[:-3]} {q}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xname.replace("_", " ") + (" (req/s)" if xname == "request_rate" else ""))
        ax.set_ylabel("latency (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
        ax2 = axes[row][1]
        ax2.plot(xs, [lv["output_tokens_per_s"] for lv in levels], "o-", label="output tok/s")
        ax2.plot(xs, [lv["goodput_requests_per_s"] * (lv["output_tokens_per_s"] /
                                                      max(lv["requests_per_s"], 1e-9))
                      for lv in levels], "x--", label="goodput (as output tok/s)")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel(ax.get_xlabel())
        ax2.set_ylabel("throughput")
        ax2.grid(True, which="both", alpha=0.3)
        sat = out["saturation"]
        knee = (sat.get("concurrency", {}).get("knee_concurrency") if xname == "concurrency"
                else sat.get("rate", {}).get("saturating_rate"))
        if knee is not None:
            for a in (ax, ax2):
                a.axvline(float(knee), color="red", linestyle=":", label="saturation")
        ax2.legend(fontsize=7)
        ax.set_title(f"{key.replace('_', ' ')}: latency vs load")
        ax2.set_title(f"{key.replace('_', ' ')}: throughput vs load")
    fig.suptitle(f"xlaserve gRPC serving  {out.get('device', '')}  {out.get('date_utc', '')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_mode = bool(argv) and argv[0] == "serve"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ec.add_engine_flags(p, max_num_seqs=256, max_num_batched_tokens=2048)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="server port (default: a free one)")
    p.add_argument("--max-in-flight", type=int, default=4096)
    p.add_argument("--stats-out", default=None, help="(serve) engine stats JSON at shutdown")
    p.add_argument("--target", default=None, help="host:port of a running server (no launch)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--sharegpt", action="store_true", help="ShareGPT-like length mix instead")
    p.add_argument("--num-prompts", type=int, default=200,
                   help="requests per level (concurrency levels use at least 2x concurrency)")
    p.add_argument("--warmup-prompts", type=int, default=8)
    p.add_argument("--rates", type=float, nargs="*", default=[2.0, 8.0, 32.0, math.inf],
                   help="Poisson request rates (req/s); inf = all at once")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--slo-e2e-ms", type=float, default=None)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--ready-timeout-s", type=float, default=1200.0)
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv[1:] if serve_mode else argv)
    # Five programs by default: (16, 8) keeps decode at concurrency <= 8 unpadded, (256, 256)
    # decode above it, (256, 8) short prefills at low load, (2048, *) mixed steps.
    if args.token_buckets is None:
        b = args.max_num_batched_tokens
        args.token_buckets = tuple(x for x in (16, 256) if x < b) + (b,)
    if args.seq_buckets is None:
        args.seq_buckets = tuple(x for x in (8,) if x < args.max_num_seqs) + (args.max_num_seqs,)
    if args.max_model_len is None:
        longest = 2048 if args.sharegpt else args.input_len + args.output_len
        args.max_model_len = math.ceil(longest / args.page_size) * args.page_size
    if serve_mode:
        return serve_main(args)

    report: dict[str, Any] = ec.run_metadata("serving", with_device=False)
    report["workload"] = {"input_len": None if args.sharegpt else args.input_len,
                          "output_len": None if args.sharegpt else args.output_len,
                          "sharegpt_like": args.sharegpt, "num_prompts": args.num_prompts}
    child = None
    stats_path = None
    target = args.target
    if target is None:
        with tempfile.NamedTemporaryFile(suffix=".json", prefix="xlaserve-serving-",
                                         delete=False) as f:
            stats_path = f.name
        if args.port is None:
            args.port = _free_port(args.host)
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "serve",
               *ec.engine_flag_argv(args), "--host", args.host, "--port", str(args.port),
               "--max-in-flight", str(args.max_in_flight), "--stats-out", stats_path]
        report["server_command"] = " ".join(cmd)
        child = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        target = f"{args.host}:{args.port}"
    try:
        asyncio.run(wait_serving(target, args.ready_timeout_s, child))
        report.update(asyncio.run(load_main(args, target)))
    finally:
        if child is not None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    text = pathlib.Path(stats_path).read_text() if stats_path else ""
    if stats_path:
        os.unlink(stats_path)
    if text:
        server = json.loads(text)
        meta = server.pop("metadata")
        for key in ("device", "platform", "num_devices", "jax", "jaxlib"):
            report[key] = meta.get(key)
        report["compiles_after_warmup"] = server.pop("compiles_after_warmup")
        report["server"] = server
    else:
        report["compiles_after_warmup"] = None  # an external server: read its own stats
    ec.write_json(args.out, report)
    png = args.plot or (str(pathlib.Path(args.out).with_suffix(".png")) if args.out else None)
    if png:
        plot(report, png)
    print(f"\nserving  {report.get('device')}  compiles_after_warmup="
          f"{report['compiles_after_warmup']}  saturation {report.get('saturation')}")
    return 0 if report["compiles_after_warmup"] in (0, None) else 3


if __name__ == "__main__":
    sys.exit(main())
