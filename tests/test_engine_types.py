"""Only the worker touches the engines: the agent loop, rewards and training loop take their data
types from k2rl.engines.types, and importing any of their modules pulls in neither vLLM, DeepSpeed
nor the engine modules that wrap them (which import those libraries lazily, so checking for the
libraries alone would miss an engine import)."""
import subprocess
import sys

PACKAGES = ["k2rl.rollout", "k2rl.loop", "k2rl.rewards"]
ENGINE_SIDE = ["vllm", "deepspeed", "k2rl.engines.rollout", "k2rl.engines.train", "k2rl.worker"]


def imported_after(modules_code: str) -> list[str]:
    code = f"""
import importlib, pkgutil, sys
{modules_code}
print(sorted(e for e in {ENGINE_SIDE!r} if any(m == e or m.startswith(e + ".") for m in sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def test_driver_side_modules_import_no_engine():
    every_module = f"""
importlib.import_module("k2rl.engines.types")
for pkg in {PACKAGES!r}:
    for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
        importlib.import_module(info.name)
"""
    assert imported_after(every_module) == []


def test_the_probe_sees_engine_imports():
    assert imported_after("import k2rl.worker, vllm, deepspeed") == sorted(ENGINE_SIDE)
