"""Resident memory of one service with several named memories (`racm3 bench memories`).

Each arm starts `racm3 serve` (embedded mode) as its own process, waits until it is
ready, sends the same traffic (retrievals spread over every memory, and a few
generations) and reads the process's resident set from /proc: VmRSS, split into
anonymous memory (the models, Python, caches) and file-backed pages (the memory-mapped
FAISS index, embeddings and document store, counted once touched). Arms:

- `1 memory`: the baseline, RACM3_MEMORY_DIR alone;
- `3 memories`: three copies of it (distinct files), RACM3_MEMORIES;
- `3 names, 1 dir`: three names on the same directory, which share one set of maps.

The process's peak (VmHWM) is recorded too: loading, not serving, sets it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import cpu_name
from benchmarks.output import publish

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("a small blue square on the left", "a big red circle at the top",
           "a green ring right of a yellow cross", "the flag of Veloria",
           "a purple diamond in the center", "a white triangle above a cyan square")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


@contextmanager
def serve_process(env: dict[str, str], bundle: Path, log: Path) -> Iterator[tuple[str, int]]:
    """`racm3 serve` (embedded) in its own process until ready: (url, pid)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "racm3.cli", "serve", "--port", str(port)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RACM3_LOG_LEVEL": "warning",
             "RACM3_BUNDLE_DIR": str(bundle), "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _arm(env: dict[str, str], names: list[str], queries: int, generations: int,
         bundle: Path, log: Path) -> dict[str, Any]:
    named = bool(env.get("RACM3_MEMORIES"))
    with serve_process(env, bundle, log) as (url, pid):
        ready = _status(pid)
        start = time.perf_counter()
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(queries):
                body: dict[str, Any] = {"text": f"{PROMPTS[i % len(PROMPTS)]} {i}", "k": 4}
                if named:
                    body["memory"] = names[i % len(names)]
                client.post("/v1/retrieve", json=body).raise_for_status()
            for i in range(generations):
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
                if named:
                    body["retrieval"] = {"memory": names[i % len(names)]}
                client.post("/v1/images/generations", json=body).raise_for_status()
        served = _status(pid)
    return {"memories": len(names), "ready_kib": ready, "served_kib": served,
            "traffic_s": round(time.perf_counter() - start, 2)}


def run(memory: Path, bundle: Path, queries: int = 300, generations: int = 6,
        workdir: Path | None = None) -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="racm3-bench-mem-", dir=workdir))
    try:
        copies = []
        for name in ("public", "team-a", "team-b"):
            dest = scratch / name
            shutil.copytree(memory, dest)
            copies.append((name, dest))
        one = copies[0][1]
        arms = {
            "1 memory": ({"RACM3_MEMORY_DIR": str(one)}, ["default"]),
            "3 memories": ({"RACM3_MEMORIES": ",".join(f"{n}={p}" for n, p in copies)},
                           [n for n, _ in copies]),
            "3 names, 1 dir": ({"RACM3_MEMORIES": ",".join(f"{n}={one}" for n, _ in copies)},
                               [n for n, _ in copies]),
        }
        out: dict[str, Any] = {"bench": "memories", "cpu": cpu_name(), "queries": queries,
                               "generations": generations,
                               "memory_bytes": sum(f.stat().st_size for f in
                                                   Path(memory).rglob("*") if f.is_file()),
                               "arms": {}}
        for name, (env, names) in arms.items():
            out["arms"][name] = _arm(env, names, queries, generations, bundle,
                                     scratch / f"{name.replace(' ', '_')}.log")
        base = out["arms"]["1 memory"]["served_kib"]["VmRSS"]
        for arm in out["arms"].values():
            arm["rss_ratio"] = round(arm["served_kib"]["VmRSS"] / base, 3)
            arm["rss_extra_mib"] = round((arm["served_kib"]["VmRSS"] - base) / 1024, 1)
        return out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def format_table(r: dict[str, Any]) -> str:
    head = (f"memories bench: {r['memory_bytes'] / 2**20:.1f} MiB per memory on disk, "
            f"{r['queries']} retrievals + {r['generations']} generations spread over the "
            f"memories, {r['cpu']}")
    rows = [f"{'arm':<16} {'RSS MiB':>8} {'anon':>7} {'file':>7} {'peak':>7} "
            f"{'x 1 mem':>8} {'+MiB':>6}"]
    for name, a in r["arms"].items():
        s = a["served_kib"]
        rows.append(f"{name:<16} {s['VmRSS'] / 1024:>8.1f} {s['RssAnon'] / 1024:>7.1f} "
                    f"{s['RssFile'] / 1024:>7.1f} {s['VmHWM'] / 1024:>7.1f} "
                    f"{a['rss_ratio']:>8.3f} {a['rss_extra_mib']:>6.1f}")
    return head + "\n" + "\n".join(rows)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path)
