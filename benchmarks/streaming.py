"""What streaming costs and what it buys (`racm3 bench streaming`).

One `racm3 serve` process (embedded mode, the given bundle and memory); the same prompts
and seeds are asked for in three ways, in rotation so that load from other processes hits
them alike:

- `plain`: a JSON answer;
- `stream 0`: `stream: true, partial_images: 0` (only the completed event);
- `stream 3`: `stream: true, partial_images: 3`.

Per arm: the median time to the final image and, for streams, to the first event, and
the streamed image's equality with the plain answer (same seed, same image).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.machine import cpu_name
from benchmarks.memories import PROMPTS, serve_process
from benchmarks.output import publish

ARMS = {"plain": None, "stream 0": 0, "stream 3": 3}


def _one(client: httpx.Client, prompt: str, seed: int, partial: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "seed": seed}
    start = time.perf_counter()
    if partial is None:
        r = client.post("/v1/images/generations", json=body)
        r.raise_for_status()
        return {"total_s": time.perf_counter() - start, "image": r.json()["data"][0]["b64_json"]}
    first = None
    image = None
    with client.stream("POST", "/v1/images/generations",
                       json={**body, "stream": True, "partial_images": partial}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            first = first or time.perf_counter() - start
            event = json.loads(line[len("data:"):])
            if event["type"] == "image_generation.completed":
                image = event["b64_json"]
    return {"total_s": time.perf_counter() - start, "first_s": first, "image": image}


def run(memory: Path, bundle: Path, requests: int = 12) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp, \
            serve_process({"RACM3_MEMORY_DIR": str(memory)}, bundle,
                          Path(tmp) / "serve.log") as (url, _), \
            httpx.Client(base_url=url, timeout=300) as client:
        _one(client, PROMPTS[0], 0, None)  # the first request pays one-off costs
        for i in range(requests):
            for arm, partial in ARMS.items():
                samples[arm].append(_one(client, PROMPTS[i % len(PROMPTS)], 100 + i, partial))
    plain = samples["plain"]
    out: dict[str, Any] = {"bench": "streaming", "cpu": cpu_name(), "requests": requests,
                           "arms": {}}
    for arm, rows in samples.items():
        entry = {"total_s_p50": statistics.median(r["total_s"] for r in rows),
                 "same_image_as_plain": all(r["image"] == p["image"]
                                            for r, p in zip(rows, plain, strict=True))}
        if ARMS[arm] is not None:
            entry["first_event_s_p50"] = statistics.median(r["first_s"] for r in rows)
        out["arms"][arm] = entry
    base = out["arms"]["plain"]["total_s_p50"]
    for entry in out["arms"].values():
        entry["total_vs_plain"] = round(entry["total_s_p50"] / base, 3)
    return out


def format_table(r: dict[str, Any]) -> str:
    head = f"streaming bench: {r['requests']} prompts per arm, median, {r['cpu']}"
    rows = [f"{'arm':<10} {'final s':>8} {'x plain':>8} {'first event s':>14} {'same image':>11}"]
    for name, a in r["arms"].items():
        first = f"{a['first_event_s_p50']:.3f}" if "first_event_s_p50" in a else "-"
        rows.append(f"{name:<10} {a['total_s_p50']:>8.3f} {a['total_vs_plain']:>8.3f} "
                    f"{first:>14} {str(a['same_image_as_plain']):>11}")
    return head + "\n" + "\n".join(rows)


def main(json_path: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    result = run(**kwargs)
    return publish(result, format_table(result), json_path)
