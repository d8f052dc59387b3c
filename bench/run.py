"""The benchmark: 1024x1024, 28-step variation with a prompt, on the GPU host.

  python bench/run.py --checkpoints TINY --rows a,b,b1,c --json OUT.json   # measure (appends rows)
  python bench/run.py --json OUT.json --table BENCHMARKS.md                # write the table

Rows: (a) stock diffusers in one process (bench/stock.py); (b) our two services end to
end through the client, encoder on cuda:0 and generator on cuda:1, default settings;
(b1) the same with both on cuda:0; (c) (b) with --turbo (fp8). Full-size architectures
with random weights (--random-weights full): the real FLOPs and memory.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.launch import ServerProcess

PROMPT = "a photo of a red circle on a blue background"
PICTURE = Image.new("RGB", (1024, 768), (90, 140, 200))
REQUEST = dict(steps=28, aspect_ratio="1:1")
# row: (devices, extra generator flags, also measure new-shape and 4-client throughput)
ROWS = {
    "b": ({"encoder": "cuda:0", "generator": "cuda:1"}, [], True),
    "b1": ({"encoder": "cuda:0", "generator": "cuda:0"}, [], False),
    "c": ({"encoder": "cuda:0", "generator": "cuda:1"}, ["--turbo"], True),
}


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


def measure_services(checkpoints: str, row: str, runs: int) -> dict:
    layout, extra, full = ROWS[row]
    servers, ports = [], {}
    for role, device in layout.items():
        ports[role] = _port()
        args = ["--random-weights", "full", "--device", device, "--metrics-port", str(ports[role])]
        if role == "generator":
            args += ["--warm-up", "variation", *extra]
        servers.append(ServerProcess(role, checkpoints, *args, log_path=f"/tmp/bench-{row}-{role}.log"))
    start = time.perf_counter()
    for server in servers:
        server.start()
    startup = {}
    try:
        for server in servers:
            server.wait_serving(timeout=900)
            startup[server.role] = time.perf_counter() - start
        client = Client(servers[0].address, servers[1].address, timeout=900)
        first = _timed(client, 0)["total"]
        timed = [_timed(client, seed) for seed in range(1, runs + 1)]
        median = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
        result = {"row": row, "first": first, "median": median, "startup": startup}
        if full:
            result["new_shape_first"] = _timed(client, 99, aspect_ratio="16:9")["total"]
            result["images_per_minute_4_clients"] = _throughput(client)
        result["peak_gpu_bytes"] = {role: _peak(port) for role, port in ports.items()}
    finally:
        for server in servers:
            server.stop(120)
    return result


def _throughput(client: Client, clients: int = 4, each: int = 2) -> float:
    """Images a minute with `clients` callers at once: encodes overlap other requests' denoising."""
    done, lock = [], threading.Lock()

    def worker(seed: int) -> None:
        for i in range(each):
            client.variation(PICTURE, prompt=PROMPT, seed=seed * 10 + i, **REQUEST)
            with lock:
                done.append(1)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done) / (time.perf_counter() - begin) * 60


def measure_stock(checkpoints: str, runs: int) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("stock.py")), "--checkpoints", checkpoints,
                          "--runs", str(runs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import diffusers
    import grpc
    import torch
    import transformers

    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "grpc": grpc.__version__, "python": platform.python_version()}


def table(results: dict, command: str) -> str:
    env, rows = results["environment"], results["rows"]
    a = rows["a"]["median"]["total"]
    lines = [
        "# Benchmarks", "",
        f"Card: {env['gpus']} x {env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}), diffusers "
        f"{env['diffusers']}, transformers {env['transformers']}, grpcio {env['grpc']}, Python {env['python']}.",
        "Workload: variation, 1024x1024, 28 steps, with a prompt; full-size architectures with random weights, "
        "bf16; medians of the timed runs after one warm request.", "",
        f"Command: `{command}`", "",
        "| row | end to end (s) | x (a) | denoise (s) | VAE decode (s) | encode RPC (s) | image encode (s) "
        "| other (s) | first request (s) | new shape (s) | start-up to SERVING (s) | images/min, 4 clients "
        "| peak GPU memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("a", "b", "b1", "c"):
        if name not in rows:
            continue
        if "error" in rows[name]:
            lines.append(f"| ({name}) | failed: {rows[name]['error'][:200]} |")
            continue
        r, m = rows[name], rows[name]["median"]
        if name == "a":
            lines.append(f"| (a) stock diffusers, one GPU, eager | {m['total']:.2f} | 1.00 | {m['pipeline']:.2f} "
                         f"(pipeline incl. VAE) | | {m['encode']:.3f} | {m['png']:.3f} | | {r['first']:.2f} | | "
                         f"| | {r['peak_gpu_bytes'] / 1e9:.1f} |")
            continue
        other = m["total"] - m["denoise"] - m["decode"] - m["encode_rpc"] - m["image_encode"]
        label = {"b": "(b) two services, two GPUs", "b1": "(b1) two services, one GPU",
                 "c": "(c) turbo fp8, two GPUs"}[name]
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in r["peak_gpu_bytes"].items())
        startup = ", ".join(f"{k} {v:.0f}" for k, v in r["startup"].items())
        lines.append(f"| {label} | {m['total']:.2f} | {m['total'] / a:.2f} | {m['denoise']:.2f} | {m['decode']:.3f} "
                     f"| {m['encode_rpc']:.3f} | {m['image_encode']:.3f} | {other:.3f} | {r['first']:.2f} "
                     f"| {_num(r, 'new_shape_first')} | {startup} | {_num(r, 'images_per_minute_4_clients', 1)} "
                     f"| {peaks} |")
    return "\n".join(lines) + "\n"


def _num(row: dict, key: str, digits: int = 2) -> str:
    return f"{row[key]:.{digits}f}" if key in row else "not measured"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints")
    parser.add_argument("--rows", default="a,b,b1,c")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", required=True, help="results file; rows are added to it")
    parser.add_argument("--table", help="write the Markdown table here")
    parser.add_argument("--command", default="python bench/run.py --checkpoints TINY --rows a,b,b1,c --json R")
    args = parser.parse_args()
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    if args.checkpoints:
        results["environment"] = environment()
        for row in args.rows.split(","):
            try:
                results["rows"][row] = (measure_stock(args.checkpoints, args.runs) if row == "a"
                                        else measure_services(args.checkpoints, row, args.runs))
            except Exception as e:  # noqa: BLE001 - one broken row must not lose the others
                results["rows"][row] = {"row": row, "error": f"{type(e).__name__}: {e}"}
            path.write_text(json.dumps(results, indent=1))
            print(json.dumps(results["rows"][row]), flush=True)
    if args.table:
        Path(args.table).write_text(table(results, args.command))


if __name__ == "__main__":
    main()
