"""`racm3`: one CLI for serving, building the memory, training, evaluation and benchmarks.

Heavy imports (torch, faiss, open_clip) happen inside each command so that
`racm3 --help` stays instant.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(
    name="racm3",
    help="Retrieval-augmented CM3: serve, build the memory, train, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


# --- bench -----------------------------------------------------------------------------


@bench_app.command("decoder")
def bench_decoder(
    device: str = typer.Option("cpu", help="cpu or cuda"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    preset: str = typer.Option("demo", help="decoder preset: demo, small, cm3-medium"),
    prompt_len: int = typer.Option(64, help="prompt tokens per row"),
    new_tokens: int = typer.Option(256, help="tokens generated per row"),
    batch: list[int] = typer.Option([1, 8], help="batch sizes (repeat the option)"),
    repeats: int = typer.Option(3, help="timed runs per measurement; the median is kept"),
    # 1 by default: on a loaded 2-core machine a second OpenMP thread made each small
    # decode step several times slower (barrier waits), for ours and HF alike
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    dtype: str | None = typer.Option(None, help="float32 or bfloat16 (default: bf16 on cuda)"),
    hf: bool = typer.Option(True, help="compare with HF GPT2LMHeadModel.generate"),
    recompute: bool = typer.Option(True, help="measure KV cache vs full recomputation"),
) -> None:
    """Decoding tokens/s at batch 1 and 8, against HF GPT-2 and against no KV cache."""
    from benchmarks.decoder import main as run_decoder_bench

    run_decoder_bench(
        json_path=json_path,
        preset=preset,
        device=device,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_sizes=tuple(batch),
        repeats=repeats,
        threads=threads,
        dtype=dtype,
        compare_hf=hf,
        recompute=recompute,
    )


@bench_app.command("train")
def bench_train(
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    steps: int = typer.Option(60, min=5, help="training steps per timed run"),
    repeats: int = typer.Option(3, min=1, help="timed runs per arm; the median is kept"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (the recipe trains on 1)"),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast, as training uses)"),
) -> None:
    """Generator training steps/s: one K per batch against one K per sequence."""
    from benchmarks.train import main as run_train_bench

    run_train_bench(json_path=json_path, steps=steps, repeats=repeats, threads=threads,
                    device=device)


@bench_app.command("service")
def bench_service(
    bundle: Path | None = typer.Option(None, help="Bundle [RACM3_BUNDLE_DIR or bundles/demo]."),
    memory: Path | None = typer.Option(None, help="Memory [RACM3_MEMORY_DIR or memory]."),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    requests: int = typer.Option(24, min=1, help="requests per task and concurrency (>= 4xC)"),
    batching_requests: int = typer.Option(48, min=16, help="requests per batching arm"),
    retrieval_queries: int = typer.Option(50, min=5, help="cache-miss queries (4x as many hits)"),
    redis_url: str = typer.Option("redis://127.0.0.1:6379/0", help="Redis for the cache arm"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Embedded-mode latency (c=1/8/32), batching gain and cache hit vs miss, over HTTP."""
    from benchmarks.service import main as run_service_bench

    run_service_bench(
        json_path=json_path,
        bundle_dir=bundle,
        memory_dir=memory,
        requests=requests,
        batching_requests=batching_requests,
        retrieval_queries=retrieval_queries,
        redis_url=redis_url,
        threads=threads,
    )


@bench_app.command("memories")
def bench_memories(
    memory: Path = typer.Option(Path("memory"), help="A built memory, copied three times."),
    bundle: Path = typer.Option(Path("bundles/demo"), help="Bundle to serve."),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    queries: int = typer.Option(300, min=1, help="retrievals, spread over the memories"),
    generations: int = typer.Option(6, min=0, help="generations, spread over the memories"),
    workdir: Path | None = typer.Option(None, help="scratch directory [system temp]"),
) -> None:
    """Service RSS with 1 memory, 3 memories, and 3 names on one memory directory."""
    from benchmarks.memories import main as run_memories_bench

    run_memories_bench(json_path=json_path, memory=memory, bundle=bundle, queries=queries,
                       generations=generations, workdir=workdir)


@bench_app.command("streaming")
def bench_streaming(
    memory: Path = typer.Option(Path("memory"), help="A built memory to serve."),
    bundle: Path = typer.Option(Path("bundles/demo"), help="Bundle to serve."),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    requests: int = typer.Option(12, min=1, help="prompts per arm"),
) -> None:
    """Time to the first event and to the final image: plain vs streamed (0 and 3 partials)."""
    from benchmarks.streaming import main as run_streaming_bench

    run_streaming_bench(json_path=json_path, memory=memory, bundle=bundle, requests=requests)


@bench_app.command("retriever")
def bench_retriever(
    n: int = typer.Option(100_000, min=1_000, help="vectors in the memory"),
    dim: int = typer.Option(128, min=8, help="vector dimension"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    index: list[str] = typer.Option(
        ["flat", "hnsw", "ivf", "ivfpq", "auto"], help="families to run (repeat the option)"),
    queries: int = typer.Option(1_000, min=10, help="held-out queries (batch QPS, recall)"),
    single: int = typer.Option(200, min=10, help="queries timed one at a time (p50/p99)"),
    # 1 by default: on a loaded 2-core machine OpenMP's spinning second thread slows FAISS
    threads: int = typer.Option(1, min=1, help="FAISS / BLAS threads"),
    workdir: Path | None = typer.Option(None, help="scratch directory [system temp]"),
) -> None:
    """FAISS families vs numpy brute force: build, mmap load, latency, QPS, recall, RSS."""
    from benchmarks.retriever import main as run_retriever_bench

    run_retriever_bench(json_path=json_path, n=n, dim=dim, families=tuple(index),
                        n_queries=queries, single=single, threads=threads, workdir=workdir)



# --- build-index -----------------------------------------------------------------------


class IndexType(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"


class SourceKind(str, Enum):
    world = "world"
    folder = "folder"
    jsonl = "jsonl"
    csv = "csv"
    parquet = "parquet"
    webdataset = "webdataset"


@app.command("build-index")
def build_index(
    source: SourceKind = typer.Option(..., help="What --input is."),
    input: str = typer.Option(
        ..., help="Folder, file, shard glob, or for --source world the split (memory)."
    ),
    out: Path = typer.Option(..., help="Memory directory (versions are published inside)."),
    bundle: Path = typer.Option(None, help="Bundle whose CLIP/VQ/tokenizer to use [demo]."),
    index_type: IndexType = typer.Option(IndexType.auto, help="FAISS index family."),
    append: bool = typer.Option(False, help="Add to the current version as a new version."),
    chunk_size: int = typer.Option(512, help="Documents embedded per chunk."),
) -> None:
    """Turn an image-text collection into a memory: CLIP index + document store."""
    from index_builder.from_bundle import build_from_bundle
    from model.bundle import DEFAULT_BUNDLE, Bundle

    b = Bundle(bundle or DEFAULT_BUNDLE)
    result = build_from_bundle(b, source.value, input, out, index_type=index_type.value,
                               append=append, chunk_size=chunk_size)
    typer.echo(f"published {out} version {result.version}: {result.documents} documents")


# --- train / eval ----------------------------------------------------------------------


class TrainStage(str, Enum):
    tokenizer = "tokenizer"
    vq = "vq"
    clip = "clip"
    judge = "judge"
    memory = "memory"
    neighbours = "neighbours"
    generator = "generator"
    baseline = "baseline"
    all = "all"


@app.command()
def train(
    stage: TrainStage = typer.Argument(..., help="One stage, or all of them in order."),
    recipe: str = typer.Option("demo", help="demo (~50 min on 2 cores) or smoke (<60 s)."),
    out: Path = typer.Option(..., help="Bundle directory to write."),
    work: Path = typer.Option(None, help="Scratch: memory, checkpoints, logs [runs/RECIPE]."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    force: bool = typer.Option(False, help="Rerun stages already recorded as done."),
    side_by_side: bool = typer.Option(
        True, help="With `all` on a CPU: train the CM3 baseline in a second process beside "
                   "RA-CM3, one core each."),
) -> None:
    """Train the demo bundle's components (resumable; stages recorded in manifest.json)."""
    import logging

    from model.pipeline import RECIPES, STAGES, Pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if recipe not in RECIPES:
        raise typer.BadParameter(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
    pipe = Pipeline(RECIPES[recipe], out, work, device=_device(device))
    stages = STAGES if stage is TrainStage.all else (stage.value,)
    pipe.run(stages, force=force,
             side_by_side=side_by_side and stage is TrainStage.all and pipe.device == "cpu")
    typer.echo(f"bundle written to {out}")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command("eval")
def eval_command(
    bundle: Path = typer.Option(None, help="Bundle (default: the shipped demo bundle)."),
    memory: Path = typer.Option(
        None, help="Memory (default: runs/RECIPE/memory, where `racm3 train` builds it)."),
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
    report_dir: Path = typer.Option(Path("reports"), help="Where eval.md and eval_grid.png go."),
    n: int = typer.Option(200, min=2, help="Prompts per task."),
    seed: int = typer.Option(0, help="Seed for item order and sampling (same for every system)."),
    batch_size: int = typer.Option(16, min=1, help="Jobs per decoder call."),
    device: str = typer.Option("auto", help="cpu, cuda, or auto."),
    threads: int = typer.Option(None, min=1, help="torch CPU threads (default: torch's choice)."),
    tasks: str = typer.Option("t2i,i2t,entity,infill", help="Comma-separated subset to run "
                              "(also: examples, controlled generation by demonstrations)."),
    new_entity: list[str] = typer.Option(
        None, help="Also append 'the flag of NAME' (a flag unlike the world's) to a copy of "
                   "the memory with build-index --append, then ask both decoders for it. "
                   "Repeat for several names (each its own flag and memory copy)."),
    new_entity_samples: int = typer.Option(8, min=1, help="Samples per decoder for that."),
    record: bool = typer.Option(
        False, help="Also write the systems' metrics into the bundle's manifest.json (under "
                    "`eval`), as the committed demo bundle carries them."),
) -> None:
    """RA-CM3 vs CM3 vs retrieval only on the held-out eval split: JSON, table, grid."""
    import logging

    import torch

    from app.retriever.memory import Memory
    from model.bundle import DEFAULT_BUNDLE, Bundle
    from model.evaluate import EvalConfig, evaluate, record_in_manifest, write_reports
    from model.report import markdown_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    b = Bundle(bundle or DEFAULT_BUNDLE, device=_device(device))
    if memory is None:
        memory = Path("runs") / b.manifest.get("recipe", {}).get("name", "demo") / "memory"
    if not memory.exists():
        raise typer.BadParameter(
            f"no memory at {memory}; build it with `racm3 build-index --source world "
            f"--input memory --out {memory} --bundle {b.path}`", param_hint="--memory")
    try:
        config = EvalConfig(n=n, seed=seed, batch_size=batch_size,
                            tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tasks") from exc
    output = evaluate(b, Memory.load(memory), config)
    if new_entity:
        # name i gets novel flag seed + i: different names, different flags
        output.result["new_entity"] = [
            _new_entity(b, memory, name, new_entity_samples, seed + i)
            for i, name in enumerate(new_entity)]
        for check in output.result["new_entity"]:
            typer.echo(f"new entity: {check}")
    paths = write_reports(output, report_dir, json_path)
    if record:
        paths["manifest"] = record_in_manifest(output, b.path)
    typer.echo(markdown_table(output.result))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def _new_entity(bundle, memory: Path, name: str, samples: int, seed: int) -> dict:
    """`new_entity_check` on a copy of the memory: the real one is never appended to."""
    import shutil
    import tempfile
    from dataclasses import asdict

    from model.evaluate import new_entity_check, novel_flag
    from model.world import World, WorldConfig

    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(memory, copy)
        check = new_entity_check(bundle, copy, name, novel_flag(world, seed),
                                 samples=samples, seed=seed)
    return {**asdict(check), "passed": check.passed}


# --- serve / generate ------------------------------------------------------------------


class ServeRole(str, Enum):
    embedded = "embedded"
    gateway = "gateway"
    retriever = "retriever"
    generator = "generator"


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in containers)."),
    port: int = typer.Option(
        None, help="Port; default 8000 (embedded, gateway), 8001 (retriever), 8002 (generator)."
    ),
    role: ServeRole = typer.Option(
        ServeRole.embedded,
        help="embedded: all three in one process. Otherwise one role, configured by "
        "RACM3_* variables (RACM3_RETRIEVER_URL, RACM3_GENERATOR_URLS, RACM3_REDIS_URL...).",
    ),
) -> None:
    """Serve the HTTP API (gateway :8000, retriever :8001, generator :8002)."""
    from app.serve import serve as run

    run(role.value, host, port)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
