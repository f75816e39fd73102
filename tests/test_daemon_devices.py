"""The engine with two devices (issue 16.3 and 16.6): each worker runs only its device's
generations, and each generation's joules come from its device's scope."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_daemon_engine import Replies, job, zoo_dirs  # noqa: F401 - fixture
from test_energy_nvml import fake_pynvml

from edged.checkers import get_checker
from edged.energy import EnergyMeter, NvmlConfig, NvmlMeter, create_meter
from edged.router import Router, RouterConfig
from edged.server.engine import Engine
from edged.zoo import Zoo

pytestmark = pytest.mark.timeout(120)
DEVICES = {"small": "cpu", "large": "cuda"}


def two_devices(zoo_dirs, meter: EnergyMeter,  # noqa: F811
                fallback: EnergyMeter | None) -> tuple[Engine, Replies, Zoo]:
    zoo = Zoo.from_dirs(list(zoo_dirs))
    replies = Replies()
    engine = Engine(zoo, Router(list(zoo.names), RouterConfig(alpha=0.9, seed=1)), meter,
                    get_checker("exact"), emit=replies, queue_size=8, devices=DEVICES,
                    fallback_meter=fallback)
    engine.start()
    return engine, replies, zoo


@pytest.fixture
def nvml_engine(zoo_dirs, monkeypatch) -> Iterator[tuple[Engine, Replies]]:  # noqa: F811
    fake = fake_pynvml(monkeypatch)
    # a 100 W GPU whose counter follows the real clock: the engine's windows use it
    fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = (
        lambda h: int(100_000 * time.monotonic()))
    meter = NvmlMeter(NvmlConfig())
    fallback = create_meter("estimate")
    engine, replies, zoo = two_devices(zoo_dirs, meter, fallback)
    try:
        yield engine, replies
    finally:
        engine.stop_all()
        engine.stop()
        meter.close()
        fallback.close()
        zoo.close()


def final(replies: Replies, rid: str) -> dict[str, Any]:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for message in replies.messages:
            if message.get("id") == rid and message.get("done") is not False:
                return message
        time.sleep(0.01)
    raise AssertionError(f"no reply to {rid}")


def test_each_model_is_measured_on_its_own_device_scope(nvml_engine):
    eng, replies = nvml_engine
    eng.submit(job("g", model="large", max_new_tokens=4))
    eng.submit(job("c", model="small", max_new_tokens=4))
    gpu, cpu = final(replies, "g"), final(replies, "c")
    assert gpu["ok"] and cpu["ok"], (gpu, cpu)
    assert gpu["energy"]["method"].startswith("nvml")
    assert gpu["energy"]["scope_channels"] == ["gpu0"]
    # the CPU model is not billed the GPU's joules: NVML does not see it, the estimate does
    assert cpu["energy"]["method"] == "estimate" and cpu["energy"]["approximate"]


def test_a_busy_device_does_not_hold_up_another(zoo_dirs):  # noqa: F811
    meter = create_meter("estimate")
    eng, replies, zoo = two_devices(zoo_dirs, meter, None)
    try:
        with eng._device_locks["cuda"]:  # the GPU is busy (a long generation)
            eng.submit(job("g1", model="large", max_new_tokens=2))
            eng.submit(job("g2", model="large", max_new_tokens=2))
            eng.submit(job("c1", model="small", max_new_tokens=2))
            assert final(replies, "c1")["ok"]  # the CPU worker did not block on the GPU
            assert not any(m.get("id", "").startswith("g") for m in replies.messages)
        assert final(replies, "g1")["ok"] and final(replies, "g2")["ok"]
    finally:
        eng.stop_all()
        eng.stop()
        meter.close()
        zoo.close()
