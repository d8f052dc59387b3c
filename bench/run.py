"""The benchmark: 1024x1024, 28-step variation with a prompt, on the GPU host.

  python bench/run.py --checkpoints TINY --rows b1,c1,c1_cache,restart --json R.json --images DIR
  python bench/run.py --checkpoints TINY --rows a,a_compile,a_fp8 --json R.json --images DIR
  python bench/run.py --json R.json --images DIR --table BENCHMARKS.md     # image differences + table

Rows: (a) stock diffusers in one process, eager (bench/stock.py); (a_compile) the same with
`compile_repeated_blocks`; (a_fp8) with torchao fp8 (row-wise) and compile; (b1) our two
services on one GPU, lossless defaults; (c1) the same with --turbo; (c1_cache) turbo with the
fixed step cache; (restart) the generator's cold start (empty --compile-cache) and warm start
(the cache from the cold one), default and turbo, with the first requests after each.
(b) and (c) are the two-GPU rows of an earlier run. Full-size architectures with random
weights (--random-weights full): the real FLOPs and memory. Each row also writes one image
(seed 7) to --images, so every speed option's difference from the lossless path is measured.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.launch import ServerProcess

PROMPT = "a photo of a red circle on a blue background"
PICTURE = Image.new("RGB", (1024, 768), (90, 140, 200))
REQUEST = dict(steps=28, aspect_ratio="1:1")
STEP_CACHE = "fixed:3"
SAMPLE_SEED = 7
# one-GPU rows: extra generator flags, and the restart entry whose cold start this row is
ROWS = {
    "b1": ([], "default"),
    "c1": (["--turbo"], "turbo"),
    "c1_cache": (["--turbo", "--step-cache", STEP_CACHE], None),
}
# first requests after a warm start: every aspect ratio, and image-conditioned modes at other sizes
FIRST_AFTER_START = [("variation", {"aspect_ratio": r}) for r in ("1:1", "16:9", "9:16", "2.4:1", "3:4", "4:3")] + [
    ("img2img", {"size": (1000, 700)}), ("inpaint", {"size": (700, 1000)})]
PEAK_BF16 = 782e12   # measured 8192^3 bf16 matmul on the H200 (bench/probe.py)
STEP_TFLOP = 95.1e12  # one FLUX.1-dev call at 4096 image + 512 text tokens (bench/probe.py's count)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = re.findall(r'qwen2vl_flux_gpu_memory_bytes\{device="\d+",kind="peak_allocated",role="\w+"\} ([\d.e+]+)',
                        text)
    return max(float(v) for v in values)


def _timed(client: Client, seed: int, **overrides) -> dict:
    start = time.perf_counter()
    bundle = client.encode(PICTURE, prompt=PROMPT)
    encoded = time.perf_counter()
    result = client.generate(bundle, seed=seed, **dict(REQUEST, **overrides))
    end = time.perf_counter()
    t = result.timings
    return {"total": end - start, "encode_rpc": encoded - start, "generate_rpc": end - encoded,
            "queue": t.get("queue_seconds", 0.0), "prepare": t.get("prepare_seconds", 0.0),
            "denoise": t["denoise_seconds"], "decode": t["decode_seconds"],
            "image_encode": t["image_encode_seconds"]}


def _sample(client: Client, images: Path | None, row: str) -> None:
    """The row's image for one seed, raw RGB, kept to compare options with each other."""
    if images is None:
        return
    result = client.variation(PICTURE, prompt=PROMPT, seed=SAMPLE_SEED, output_format="raw", **REQUEST)
    images.mkdir(parents=True, exist_ok=True)
    result.images[0].save(images / f"{row}.png", compress_level=1)


def _first_requests(client: Client) -> dict:
    """The first request of each other shape after a start, then the same again warm (8 steps:
    a fixed start-up cost weighs more than at 28)."""
    out = {}
    for mode, extra in FIRST_AFTER_START[1:]:
        size = extra.get("size")
        params = dict(REQUEST, steps=8, **{k: v for k, v in extra.items() if k != "size"})
        if size:
            params.pop("aspect_ratio")
            params.update(strength=1.0)
        picture = PICTURE.resize(size) if size else PICTURE
        if mode == "inpaint":
            params["mask"] = Image.new("L", picture.size, 255)
        name = f"{mode} {extra.get('aspect_ratio') or '%dx%d' % size}"
        times = []
        for seed in (0, 1):
            start = time.perf_counter()
            client.run(mode, picture, prompt=PROMPT, seed=seed, **params)
            times.append(time.perf_counter() - start)
        out[name] = {"first": times[0], "warm": times[1], "ratio": times[0] / times[1]}
    return out


def _generator(checkpoints: str, flags: list[str], cache: Path, port: int, log: str) -> ServerProcess:
    args = ["--random-weights", "full", "--device", "cuda:0", "--metrics-port", str(port),
            "--warm-up", "variation,img2img,inpaint", "--compile-cache", str(cache), *flags]
    return ServerProcess("generator", checkpoints, *args, log_path=log)


def _started(server: ServerProcess, client: Client) -> dict:
    start = time.perf_counter()
    server.start()
    server.wait_serving(timeout=900)
    serving = time.perf_counter() - start
    info = client.info()["generator"].startup
    return {"serving": serving, "compile_cache": info.compile_cache, "phases": dict(info.phase_seconds)}


def measure_services(checkpoints: str, rows: list[str], runs: int, images: Path | None, results: dict,
                     save) -> None:
    """Rows b1, c1, c1_cache and restart on one GPU: one encoder serves them all."""
    encoder = ServerProcess("encoder", checkpoints, "--random-weights", "full", "--device", "cuda:0",
                            log_path="/tmp/bench-encoder.log")
    encoder.start().wait_serving(timeout=900)
    caches = {key: Path(tempfile.mkdtemp(prefix=f"bench-cache-{key}-")) for key in ("default", "turbo")}
    restart = results["rows"].setdefault("restart", {"row": "restart"})
    try:
        for row in rows:
            flags, key = ROWS[row]
            port = _port()
            cache = caches[key or "turbo"]
            server = _generator(checkpoints, flags, cache, port, f"/tmp/bench-{row}-generator.log")
            server.port = _port()
            try:
                client = Client(encoder.address, server.address, timeout=900)
                started = _started(server, client)
                first = _timed(client, 0)["total"]
                timed = [_timed(client, seed) for seed in range(1, runs + 1)]
                median = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
                _sample(client, images, row)
                results["rows"][row] = {"row": row, "first": first, "median": median, "startup": started,
                                        "peak_gpu_bytes": {"generator": _peak(port)}, "flags": flags}
                save(row)
                if key:
                    restart[key] = {"cold": dict(started, first_request=first, warm_request=median["total"])}
                    server.stop(120)
                    warm = _started(server, client)
                    warm["first_request"] = _timed(client, 0)["total"]
                    warm["warm_request"] = _timed(client, 1)["total"]
                    warm["first_requests"] = _first_requests(client)
                    restart[key]["warm"] = warm
                    save("restart")
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                results["rows"][row] = {"row": row, "error": f"{type(e).__name__}: {e}"}
                save(row)
            finally:
                server.stop(120)
    finally:
        encoder.stop(120)
        for cache in caches.values():
            shutil.rmtree(cache, ignore_errors=True)


def measure_stock(checkpoints: str, row: str, runs: int, images: Path | None, timeout: float) -> dict:
    variant = {"a": "eager", "a_compile": "compile", "a_fp8": "fp8"}[row]
    args = [sys.executable, str(Path(__file__).with_name("stock.py")), "--checkpoints", checkpoints,
            "--runs", str(runs), "--variant", variant, "--sample-seed", str(SAMPLE_SEED)]
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        args += ["--sample", str(images / f"{row}.png")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"stock.py {variant} exited {out.returncode}: {out.stderr[-600:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import diffusers
    import grpc
    import torch
    import transformers

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "grpc": grpc.__version__, "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def image_differences(images: Path, reference: str = "b1") -> dict:
    """PSNR and max abs difference of each row's seed-7 image against the lossless path's."""
    ref_path = images / f"{reference}.png"
    if not ref_path.exists():
        return {}
    ref = np.asarray(Image.open(ref_path).convert("RGB"), dtype=np.float64)
    out = {}
    for path in sorted(images.glob("*.png")):
        if path.stem == reference:
            continue
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        mse = float(((img - ref) ** 2).mean())
        out[path.stem] = {"vs": reference, "psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse),
                          "max_abs": int(np.abs(img - ref).max())}
    return out


ROW_LABELS = {
    "a": "(a) stock diffusers, eager", "a_compile": "(a_compile) stock + compile_repeated_blocks",
    "a_fp8": "(a_fp8) stock + torchao fp8 + compile", "b1": "(b1) our services, one GPU, lossless",
    "c1": "(c1) turbo (fp8), one GPU", "c1_cache": f"(c1_cache) turbo + step cache {STEP_CACHE}",
    "b": "(b) two services, two GPUs (earlier two-GPU run)", "c": "(c) turbo, two GPUs (earlier two-GPU run)",
}


def table(results: dict, command: str) -> str:
    env, rows = results["environment"], results["rows"]
    a = rows["a"]["median"]["total"] if "median" in rows.get("a", {}) else None
    diffs = results.get("image_differences", {})
    lines = [
        "# Benchmarks", "",
        f"Card: {env['gpus']} x {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers "
        f"{env['diffusers']}, transformers {env['transformers']}, grpcio {env['grpc']}, Python {env['python']}.",
        "Workload: variation, 1024x1024, 28 steps, with a prompt; full-size architectures with random weights, "
        "bf16; medians of the timed runs after one warm request. MFU: the transformer's matmul FLOPs per step "
        f"({STEP_TFLOP / 1e12:.1f} TFLOP) over the measured step time, against the measured bf16 matmul peak "
        f"({PEAK_BF16 / 1e12:.0f} TFLOP/s).", "",
        f"Command: `{command}`", "",
        "| row | end to end (s) | x (a) | denoise (s) | s/step | MFU | VAE decode (s) | encode RPC (s) "
        "| image encode (s) | other (s) | first request (s) | start-up to SERVING (s) | peak GPU memory (GB) "
        "| image vs (b1): PSNR dB / max abs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("a", "a_compile", "a_fp8", "b1", "c1", "c1_cache", "b", "c"):
        if name not in rows:
            continue
        r = rows[name]
        label = ROW_LABELS[name]
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error'][:200]} |")
            continue
        m = r["median"]
        ratio = f"{m['total'] / a:.2f}" if a else ""
        diff = diffs.get(name)
        diff_text = f"{diff['psnr_db']:.1f} / {diff['max_abs']}" if diff else ""
        peaks = r["peak_gpu_bytes"]
        peak_text = (f"{peaks / 1e9:.1f}" if isinstance(peaks, (int, float))
                     else ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peaks.items()))
        if name.startswith("a"):
            computed = 28
            per_step = m["pipeline"] / computed
            lines.append(f"| {label} | {m['total']:.2f} | {ratio} | {m['pipeline']:.2f} (pipeline incl. VAE) "
                         f"| {per_step:.3f} | | | {m['encode']:.3f} | {m['png']:.3f} | | {r['first']:.2f} "
                         f"| {r.get('warm_up_seconds', 0):.0f} (compile in the first call) | {peak_text} "
                         f"| {diff_text} |")
            continue
        computed = 28 - len(_skipped(r.get("flags", [])))
        per_step = m["denoise"] / computed
        mfu = f"{STEP_TFLOP / per_step / PEAK_BF16:.0%}" if name in ("b1", "b") else ""
        other = m["total"] - m["denoise"] - m["decode"] - m["encode_rpc"] - m["image_encode"]
        startup = r["startup"]
        startup_text = (f"{startup['serving']:.0f} (cache {startup['compile_cache']})" if "serving" in startup
                        else ", ".join(f"{k} {v:.0f}" for k, v in startup.items()))
        lines.append(f"| {label} | {m['total']:.2f} | {ratio} | {m['denoise']:.2f} | {per_step:.3f} | {mfu} "
                     f"| {m['decode']:.3f} | {m['encode_rpc']:.3f} | {m['image_encode']:.3f} | {other:.3f} "
                     f"| {r['first']:.2f} | {startup_text} | {peak_text} | {diff_text} |")
    restart = rows.get("restart", {})
    if any(k in restart for k in ("default", "turbo")):
        lines += ["", "Generator start-up (to SERVING, warm-up included; weights built apart), and the first "
                  "request after it:", "",
                  "| generator | start | to SERVING (s) | weights (s) | warm-up (s) | cache | first request (s) "
                  "| warm request (s) | worst first/warm of the other shapes (8 steps) |", "|---|---|---|---|---|---|---|---|---|"]
        for key in ("default", "turbo"):
            for phase in ("cold", "warm"):
                entry = restart.get(key, {}).get(phase)
                if not entry:
                    continue
                p = entry["phases"]
                shapes = entry.get("first_requests", {})
                worst = max(shapes.items(), key=lambda kv: kv[1]["ratio"]) if shapes else None
                first, warm = entry["first_request"], entry["warm_request"]
                worst_text = f"{worst[1]['ratio']:.2f} ({worst[0]})" if worst else ""
                lines.append(f"| {key} | {phase} | {entry['serving']:.1f} | {p.get('weights', 0):.1f} "
                             f"| {p.get('warm_up', 0):.1f} | {entry['compile_cache']} | {first:.2f} | {warm:.2f} "
                             f"| {worst_text} |")
    return "\n".join(lines) + "\n"


def _skipped(flags: list[str]) -> frozenset[int]:
    if "--step-cache" not in flags:
        return frozenset()
    from qwen2vl_flux.generator_server.pipeline import StepCache

    return StepCache.parse(flags[flags.index("--step-cache") + 1]).skipped(28)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints")
    parser.add_argument("--rows", default="b1,c1,c1_cache")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", required=True, help="results file; rows are added to it")
    parser.add_argument("--images", help="folder for each row's seed-7 image")
    parser.add_argument("--stock-timeout", type=float, default=400)
    parser.add_argument("--table", help="write the Markdown table here")
    parser.add_argument("--command", default="python bench/run.py --checkpoints TINY --rows ROWS --json R")
    args = parser.parse_args()
    path = Path(args.json)
    images = Path(args.images) if args.images else None
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}

    def save(row: str) -> None:
        results["rows"][row]["machine"] = dict(results["environment"], row_started=time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps({row: results["rows"][row]}), flush=True)

    if args.checkpoints:
        results["environment"] = environment()
        rows = args.rows.split(",")
        services = [r for r in rows if r in ROWS]
        if services:
            measure_services(args.checkpoints, services, args.runs, images, results, save)
        for row in rows:
            if row in ROWS or row == "restart":
                continue
            try:
                results["rows"][row] = measure_stock(args.checkpoints, row, args.runs, images, args.stock_timeout)
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                results["rows"][row] = {"row": row, "error": f"{type(e).__name__}: {e}"}
            save(row)
    if images is not None and images.exists():
        results["image_differences"] = image_differences(images)
        path.write_text(json.dumps(results, indent=1))
    if args.table:
        Path(args.table).write_text(table(results, args.command))


if __name__ == "__main__":
    main()
