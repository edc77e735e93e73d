"""Where a generate's time goes, for comparing two engines side by side (`bench_gpu_step.py --profile`,
`bench_rollout_settings.py --profile`): GPU kernels and launches under torch's profiler, the host's
CUDA calls, Python's garbage collector, each thread's CPU time, and the host's Python functions under
cProfile. Each side profiles in its own process and sends its dict back as JSON."""
from __future__ import annotations

import gc
import os
import resource
import sys
import threading
import time

import torch

ON_GPU = torch.cuda.is_available()


def timed(fn):
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if ON_GPU:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def profile_generate(generate, top: int = 16) -> dict:
    """Two generates, one under torch's profiler: its wall seconds, the seconds and launches of its GPU
    kernels (on a CPU: its operators' own time) and the `top` kernels by time, with the seconds Python's
    garbage collector ran, its full collections and the objects it tracks (a trainer in the process adds
    its own), the process's Python threads and torch's CPU threads, its CPU seconds and involuntary
    context switches, and the CPU seconds of each of its threads by name ("threads": one busy beside
    the loop); one under cProfile: its wall, the own time of all functions and the `top` of them
    ("host"). Also the host's calls into CUDA by own CPU time ("runtime") and where each Python thread
    is. Where two engines' walls differ but their kernels do not, the difference is host time between
    the kernels: the host table says whose, or, where the functions' own times agree too, that the
    loop waited: on the GPU or in the driver (the runtime table), or for a core or the GIL (threads)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    collector = GarbageCollectorTime()
    threads_before, usage_before = thread_cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    with collector, profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])) as prof:
        _, seconds = timed(generate)
    threads_after, usage_after = thread_cpu_seconds(), resource.getrusage(resource.RUSAGE_SELF)
    places = python_thread_places()
    thread_cpu: dict[str, list] = {}  # by thread name, the threads of one pool added up: [seconds, threads]
    for tid, (name, cpu) in threads_after.items():
        seconds_and_count = thread_cpu.setdefault(name, [0.0, 0])
        seconds_and_count[0] += cpu - threads_before.get(tid, (name, 0.0))[1]
        seconds_and_count[1] += 1
    kind = torch.autograd.DeviceType.CUDA if ON_GPU else torch.autograd.DeviceType.CPU
    events = prof.key_averages()
    rows = sorted(((e.self_device_time_total if ON_GPU else e.self_cpu_time_total) / 1e6, e.count, e.key)
                  for e in events if e.device_type == kind)[::-1]
    # the host's calls into CUDA (launches, graph launches, copies, synchronizations): where a loop that
    # does the same work waits longer, on the GPU (a synchronization) or in the driver (a launch)
    runtime = sorted((e.self_cpu_time_total / 1e6, e.count, e.key) for e in events
                     if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("cu"))[::-1]
    host = cProfile.Profile()
    _, host_wall = host.runcall(timed, generate)
    functions = sorted(((tottime, calls, f"{os.path.basename(file)}:{line}({name})")
                        for (file, line, name), (_, calls, tottime, _, _) in pstats.Stats(host).stats.items()))[::-1]
    busiest = sorted(((cpu, count, name) for name, (cpu, count) in thread_cpu.items()), reverse=True)
    return {"wall_s": seconds, "kernel_s": sum(r[0] for r in rows), "launches": sum(r[1] for r in rows),
            "gc_s": collector.seconds, "gc_full_collections": collector.full, "gc_objects": len(gc.get_objects()),
            "python_threads": threading.active_count(), "torch_threads": torch.get_num_threads(),
            "process_cpu_s": (usage_after.ru_utime + usage_after.ru_stime - usage_before.ru_utime - usage_before.ru_stime),
            "involuntary_switches": usage_after.ru_nivcsw - usage_before.ru_nivcsw,
            "cpus_allowed": len(os.sched_getaffinity(0)), "cprofile_wall_s": host_wall,
            "cprofile_own_s": sum(f[0] for f in functions),
            "top": [[name, s, count] for s, count, name in rows[:top]],
            "host": [[name, s, count] for s, count, name in functions[:top]],
            "threads": [[name, cpu, count] for cpu, count, name in busiest[:top]],
            "runtime": [[name, s, count] for s, count, name in runtime[:top]], "python_thread_places": places}


def python_thread_places() -> list[str]:
    """Each Python thread's name and the function it is in now (a thread that runs Python beside the
    loop takes the GIL from it)."""
    frames = sys._current_frames()
    places = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        code = frame.f_code if frame else None
        where = f"{os.path.basename(code.co_filename)}:{frame.f_lineno}({code.co_name})" if code else "?"
        places.append(f"{thread.name}: {where}")
    return places


def thread_cpu_seconds() -> dict[int, tuple[str, float]]:
    """Each of this process's threads (native ones too: NCCL's watchdog, OpenMP's pool): its name and
    the CPU seconds it has used, from /proc. A thread busy beside a host-bound loop takes its core. The
    calling thread (the loop's) is named apart: torch's CPU pool shares the process's name with it."""
    ticks, loop = os.sysconf("SC_CLK_TCK"), threading.get_native_id()
    threads = {}
    for task in os.scandir("/proc/self/task"):
        try:
            with open(f"{task.path}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"{task.path}/comm") as f:
                name = f.read().strip()
        except OSError:  # it ended meanwhile
            continue
        tid = int(task.name)
        threads[tid] = (f"{name} (the loop)" if tid == loop else name, (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return threads


class GarbageCollectorTime:
    """Within it: the seconds Python's garbage collector ran and its full (generation 2) collections,
    from gc.callbacks. A host-bound loop pays for every collection; a full one walks every object the
    process tracks."""

    def __init__(self):
        self.seconds, self.full, self._start = 0.0, 0, 0.0

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._start
        self.full += info["generation"] == 2

    def __enter__(self):
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_collection)


def compare_profiles(label: str, first_name: str, first: dict, other: dict) -> dict[str, float]:
    """Print two `profile_generate`s side by side (wall, kernels, garbage collector, threads, CPU and
    cProfile totals, then of either side the top kernels, CUDA calls from the host, host functions and
    threads by CPU seconds: seconds and calls in each; last where each Python thread is); returns
    `label`'s wall and kernel seconds and launches as fractions of `first`'s, and both sides' garbage
    collector seconds."""
    tag = f"[{label} profile]"
    print(f"{tag} {'kernel':<70} {first_name + ' s':>10} {'n':>7} {label + ' s':>10} {'n':>7}")
    for name, key in (("wall", "wall_s"), ("all kernels", "kernel_s"), ("garbage collector", "gc_s"),
                      ("full collections", "gc_full_collections"), ("objects tracked", "gc_objects"),
                      ("Python threads", "python_threads"), ("torch CPU threads", "torch_threads"),
                      ("process CPU seconds", "process_cpu_s"), ("involuntary context switches", "involuntary_switches"),
                      ("CPUs allowed", "cpus_allowed"), ("wall under cProfile", "cprofile_wall_s"),
                      ("own time of all functions under cProfile", "cprofile_own_s")):
        cell = "{:>10d}" if isinstance(first[key], int) else "{:>10.3f}"  # counts whole, seconds to the ms
        print(f"{tag} {name:<70} {cell.format(first[key])} {'':>7} {cell.format(other[key])}")
    for table, title in (("top", None), ("runtime", "CUDA call from the host (own CPU time, under torch's profiler)"),
                         ("host", "host function (own time, under cProfile)"),
                         ("threads", "thread (CPU seconds in the profiled generate)")):
        if title:
            print(f"{tag} {title:<70}")
        rows = {name: {} for name, _, _ in first[table] + other[table]}
        for which, profile in (("first", first), ("other", other)):
            for name, seconds, count in profile[table]:
                rows[name][which] = (seconds, count)
        for name, cells in rows.items():
            (fs, fn), (os_, on) = cells.get("first", (0.0, 0)), cells.get("other", (0.0, 0))
            print(f"{tag} {name[:70]:<70} {fs:>10.3f} {fn:>7} {os_:>10.3f} {on:>7}")
    for name, profile in ((first_name, first), (label, other)):
        print(f"{tag} Python threads of {name}: {'; '.join(profile['python_thread_places'])}")
    return {f"{label}/profiled_wall_vs_{first_name}": other["wall_s"] / first["wall_s"],
            f"{label}/kernel_s_vs_{first_name}": other["kernel_s"] / first["kernel_s"],
            f"{label}/launches_vs_{first_name}": other["launches"] / first["launches"],
            f"{label}/gc_s_beside_{first_name}": other["gc_s"], f"{label}/{first_name}_gc_s": first["gc_s"]}
