"""The node side of monitoring added for the monitor service: reports to several monitor replicas, and
GPU memory/utilization through NVML when present (absent otherwise)."""

from __future__ import annotations

import sys
import types

import structlog

from services.inference.reporter import NvmlGpus, ResourceSampler, StatsReporter, monitor_addresses
from services.inference.settings import InferenceServerSettings
from services.inference.stats import ClosedWindow, StatsWindow


def test_monitor_addresses():
    assert monitor_addresses("a:1") == ["a:1"]
    assert monitor_addresses(" a:1, b:2 ,a:1,") == ["a:1", "b:2"]
    assert monitor_addresses("") == []


async def test_every_report_goes_to_every_monitor_with_its_own_buffer():
    sequence = iter(range(100))

    def source() -> list[ClosedWindow]:
        window = StatsWindow(0)
        window.success = next(sequence)
        return [ClosedWindow("m", "1", window, 10, 0, 0)]

    settings = InferenceServerSettings(monitor_address="127.0.0.1:1,127.0.0.1:2", monitor_buffer_max_reports=2)
    reporter = StatsReporter(settings, source=source, reporter_id="node-a", logger=structlog.get_logger())
    assert reporter.addresses == ["127.0.0.1:1", "127.0.0.1:2"] and reporter.address == "127.0.0.1:1,127.0.0.1:2"
    for _ in range(3):
        await reporter.collect()
    for destination in reporter.destinations:
        assert [r.deltas[0].success_count for r in destination.buffer] == [1, 2]
    assert reporter.pending == 2 and reporter.reports_dropped == 2  # one per monitor
    # One monitor catching up does not affect the other's buffer.
    reporter.destinations[0].buffer.clear()
    assert len(reporter.destinations[1].buffer) == 2 and reporter.pending == 2


def test_nvml_absent_means_no_gpu_figures():
    nvml = NvmlGpus()
    usage = ResourceSampler(nvml=nvml).sample()
    # This machine has no NVIDIA driver: the fields stay unset (absent), and NVML is not asked again.
    assert usage.gpu_memory_total_bytes == 0 and usage.gpu_utilization_percent == 0
    assert nvml.failure is not None and nvml.sample() is None


def test_nvml_figures_are_summed_over_devices(monkeypatch):
    calls = {"init": 0}
    memory = {0: (10, 100), 1: (30, 200)}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: calls.__setitem__("init", calls["init"] + 1),
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=memory[h][0], total=memory[h][1]),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=20 if h == 0 else 60),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = ResourceSampler(nvml=NvmlGpus())
    usage = sampler.sample()
    assert (usage.gpu_memory_used_bytes, usage.gpu_memory_total_bytes, usage.gpu_utilization_percent) == (40, 300, 40)
    sampler.sample()
    assert calls["init"] == 1  # initialised once
