"""`racm3`: one CLI for serving, building the memory, training, evaluation and benchmarks.

Heavy imports (torch, faiss, open_clip) happen inside each command so that
`racm3 --help` stays instant.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import NoReturn

import typer

# Plain help text: Rich markup would read the "[demo]"-style defaults in the help strings
# as style tags and print nothing in their place.
app = typer.Typer(
    name="racm3",
    help="Retrieval-augmented CM3: serve, build the memory, train, evaluate, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
bench_app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True,
                        rich_markup_mode=None)
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
    compile_mode: str = typer.Option(
        "auto", "--compile",
        help="decode step under torch.compile: auto (on cuda only), on (cpu too), off"),
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
        compile=compile_mode,
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
    baseline: bool = typer.Option(
        False, help="also measure the plain decoding path against the fast one (same run)"),
    baseline_only: bool = typer.Option(
        False, help="only the plain-vs-fast comparison (implies --baseline)"),
    soak_s: float = typer.Option(0.0, min=0, help="with --baseline: soak the fast server "
                                 "this long, sampling RSS and prefix-cache bytes"),
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
        baseline=baseline or baseline_only,
        full=not baseline_only,
        soak_s=soak_s,
    )


@bench_app.command("guidance")
def bench_guidance(
    memory: Path = typer.Option(..., help="The bundle's memory (appended to only in a copy)."),
    bundle: Path = typer.Option(None, help="Bundle (default: the shipped demo bundle)."),
    weights: str = typer.Option("0,0.5,0.9", help="Comma-separated retrieval_guidance values."),
    n: int = typer.Option(100, min=2, help="Prompts per measure (none of them the eval's)."),
    novel: int = typer.Option(12, min=0, help="Flags the world never makes to append (0: skip)."),
    novel_samples: int = typer.Option(2, min=1, help="Samples per flag and phrasing."),
    mode: str = typer.Option(None, help="dense or hybrid (default: the service's default)."),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
) -> None:
    """Retrieval guidance weights on prompts and seeds outside the eval's: t2i, entities,
    appended out-of-distribution flags (API defaults), entity captions."""
    from benchmarks.guidance import main as run_guidance_bench
    from model.bundle import DEFAULT_BUNDLE

    try:
        values = [float(w) for w in weights.split(",") if w.strip()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--weights") from exc
    if mode not in (None, "dense", "hybrid"):
        raise typer.BadParameter("dense or hybrid", param_hint="--mode")
    run_guidance_bench(bundle or DEFAULT_BUNDLE, memory, values, n, threads, json_path,
                       novel, novel_samples, mode)


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


@bench_app.command("hybrid")
def bench_hybrid(
    bundle: Path = typer.Option(Path("bundles/demo"), help="Bundle (CLIP, judge, world)."),
    memory: Path = typer.Option(..., help="A memory built from the bundle's world."),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    n: int = typer.Option(200, min=10, help="prompts per set (the eval's n)"),
    new_names: int = typer.Option(10, min=1, help="novel flags appended, one name each"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    workdir: Path | None = typer.Option(None, help="scratch directory [system temp]"),
) -> None:
    """Dense vs hybrid retrieval: entity and new-name hits, t2i retrieval quality, cost."""
    from benchmarks.hybrid import main as run_hybrid_bench

    run_hybrid_bench(json_path=json_path, bundle_dir=bundle, memory_dir=memory, n=n,
                     new_names=new_names, threads=threads, workdir=workdir)

@bench_app.command("lexical")
def bench_lexical(
    n: int = typer.Option(100_000, min=1_000, help="captions indexed"),
    json_path: Path | None = typer.Option(None, "--json", help="write the results here"),
    workdir: Path | None = typer.Option(None, help="scratch directory [system temp]"),
) -> None:
    """The BM25 index (bm25s) against tantivy: build, load, latency, reproducible bytes."""
    from benchmarks.lexical import main as run_lexical_bench

    run_lexical_bench(json_path=json_path, n=n, workdir=workdir)


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
    bundle: Path = typer.Option(
        None, help="Bundle whose CLIP/VQ/tokenizer to use [RACM3_BUNDLE_DIR, else demo]."),
    index_type: IndexType = typer.Option(IndexType.auto, help="FAISS index family."),
    append: bool = typer.Option(
        False, help="Add to the current version as a new version (the current one is "
                    "verified first; a damaged one is refused)."),
    chunk_size: int = typer.Option(512, help="Documents embedded per chunk."),
) -> None:
    """Turn an image-text collection into a memory: CLIP index + document store."""
    import logging

    from model.bundle import Bundle, BundleError, default_bundle_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        b = Bundle(bundle or default_bundle_dir())  # before the heavy imports: fails fast
    except BundleError as exc:
        _refuse("build-index", exc)
    import world.source  # noqa: F401  (registers the "world" source)
    from retrieval.build import BuildError
    from retrieval.from_bundle import build_from_bundle

    try:
        result = build_from_bundle(b, source.value, input, out, index_type=index_type.value,
                                   append=append, chunk_size=chunk_size)
    except BuildError as exc:
        _refuse("build-index", exc)
    typer.echo(f"published {out} version {result.version}: {result.documents} documents")


def _refuse(command: str, exc: Exception) -> NoReturn:
    """A refusal the user can act on: its message, exit status 1, no traceback."""
    typer.echo(f"{command}: {exc}", err=True)
    raise typer.Exit(1) from None


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

    from training.pipeline import RECIPES, STAGES, Pipeline

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
    bundle: Path = typer.Option(
        None, help="Bundle [RACM3_BUNDLE_DIR, else the shipped demo bundle]."),
    memory: Path = typer.Option(
        None, help="Memory [RACM3_MEMORY_DIR, else memory: the one `make serve` builds]."),
    json_path: Path = typer.Option(None, "--json", help="Write the results JSON here."),
    report_dir: Path = typer.Option(
        None, help="Write eval.md and eval_grid.png here (e.g. reports); none without it."),
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
    novel_flags: int = typer.Option(
        12, min=0, help="With --new-entity: also append this many flags of kinds the world "
                        "never makes (checkerboards, discs, chevrons...) and ask for each "
                        "with the API's default settings, retrieval on and off (0: skip)."),
    novel_flag_samples: int = typer.Option(4, min=1, help="Samples per flag and phrasing."),
    record: bool = typer.Option(
        False, help="Also write the systems' metrics into the bundle's manifest.json (under "
                    "`eval`), as the committed demo bundle carries them."),
) -> None:
    """RA-CM3 vs CM3 vs retrieval only on the held-out eval split: JSON, table, grid."""
    import logging

    from model.bundle import Bundle, default_bundle_dir

    bundle = bundle or default_bundle_dir()
    memory = memory or default_memory_dir()
    if not memory.exists():  # before the heavy imports: a wrong path fails at once
        raise typer.BadParameter(
            f"no memory at {memory}; build it with `racm3 build-index --source world "
            f"--input memory --out {memory} --bundle {bundle}`", param_hint="--memory")

    import torch

    from evaluation.evaluate import EvalConfig, evaluate, record_in_manifest, write_reports
    from evaluation.report import markdown_table
    from retrieval.memory import Memory

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
    b = Bundle(bundle, device=_device(device))
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
        if novel_flags:
            output.result["novel_flags"] = _novel_flags(b, memory, novel_flags,
                                                        novel_flag_samples, seed)
            typer.echo(f"novel flags drawn: {output.result['novel_flags']['drawn']}; "
                       f"captions named: {output.result['novel_flags']['caption_named']}")
    paths = write_reports(output, report_dir, json_path)
    if record:
        paths["manifest"] = record_in_manifest(output, b.path)
    typer.echo(markdown_table(output.result))
    if paths:
        typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


def default_memory_dir() -> Path:
    """The memory the service serves by default: RACM3_MEMORY_DIR, else `memory`."""
    from app.settings import RetrieverSettings

    return RetrieverSettings().memory_dir


def _new_entity(bundle, memory: Path, name: str, samples: int, seed: int) -> dict:
    """`new_entity_check` on a copy of the memory: the real one is never appended to."""
    import shutil
    import tempfile
    from dataclasses import asdict

    from evaluation.evaluate import new_entity_check, novel_flag
    from world import World, WorldConfig

    world = World(WorldConfig.from_dict(bundle.manifest["world"]))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(memory, copy)
        check = new_entity_check(bundle, copy, name, novel_flag(world, seed),
                                 samples=samples, seed=seed)
    return {**asdict(check), "passed": check.passed}


def _novel_flags(bundle, memory: Path, n_flags: int, samples: int, seed: int) -> dict:
    """`novel_flags_check` on a copy of the memory: the real one is never appended to."""
    import shutil
    import tempfile

    from evaluation.evaluate import novel_flags_check

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "memory"
        shutil.copytree(memory, copy)
        return novel_flags_check(bundle, copy, n_flags, samples=samples, seed=seed)


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
