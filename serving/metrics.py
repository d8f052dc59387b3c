"""Prometheus metrics of one server process, served on `--metrics-port`."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, role: str):
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.requests = Counter("qwen2vl_flux_requests_total", "RPCs by method and final status",
                                ["role", "rpc", "status"], **labels)
        self.duration = Histogram("qwen2vl_flux_request_duration_seconds", "RPC wall time by method and status",
                                  ["role", "rpc", "status"], buckets=_SECONDS, **labels)
        self.queue_time = Histogram("qwen2vl_flux_queue_seconds", "time an admitted request waited for the model",
                                    ["role", "rpc"], buckets=_SECONDS, **labels)
        self.step_time = Histogram("qwen2vl_flux_denoise_step_seconds", "one denoise step (generator)",
                                   ["role"], buckets=_SECONDS, **labels)
        self.in_flight = Gauge("qwen2vl_flux_in_flight", "requests running on the model", ["role"], **labels)
        self.queued = Gauge("qwen2vl_flux_queued", "requests waiting for the model", ["role"], **labels)
        self.rejected = Counter("qwen2vl_flux_rejected_total", "requests refused at admission", ["role", "reason"],
                                **labels)
        self.gpu_memory = Gauge("qwen2vl_flux_gpu_memory_bytes", "GPU memory of this process, per device",
                                ["role", "kind", "device"], **labels)
        self.cache = Counter("qwen2vl_flux_encoder_cache_total", "encoder cache lookups", ["result"], **labels)
        self.role = role
        # Present from the start, so an autoscaler can read a fresh replica.
        self.queued.labels(role).set(0)
        self.in_flight.labels(role).set(0)

    def track_gpu(self, device) -> None:
        """GPU memory series for the device the model lives on (others are never touched)."""
        import torch

        if device.type != "cuda":
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        for kind, reader in (("allocated", torch.cuda.memory_allocated), ("reserved", torch.cuda.memory_reserved),
                             ("peak_allocated", torch.cuda.max_memory_allocated)):
            self.gpu_memory.labels(self.role, kind, str(index)).set_function(
                lambda reader=reader: float(reader(index)))

    def track_step_graphs(self, graphs) -> None:
        """The generator's CUDA graphs (step_graphs.StepGraphs): velocity calls captured and
        replayed, captures that failed, graphs kept."""
        self.registry.register(_StepGraphCollector(self.role, graphs))

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_rpc(self, rpc: str, status: str, seconds: float) -> None:
        self.requests.labels(self.role, rpc, status).inc()
        self.duration.labels(self.role, rpc, status).observe(seconds)


class _StepGraphCollector:
    def __init__(self, role: str, graphs):
        self.role, self.graphs = role, graphs

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        calls = CounterMetricFamily("qwen2vl_flux_step_graphs", "CUDA graphs of the velocity call: captures, "
                                    "replays and captures that failed", labels=["role", "result"])
        for result, count in (("captured", self.graphs.captures), ("replayed", self.graphs.replays),
                              ("failed", self.graphs.failed)):
            calls.add_metric([self.role, result], count)
        yield calls
        kept = GaugeMetricFamily("qwen2vl_flux_step_graphs_kept", "CUDA graphs kept", labels=["role"])
        kept.add_metric([self.role], len(self.graphs.graphs))
        yield kept
