"""Shared fixtures.

`smoke_bundle` trains the smoke recipe end to end once per session (every stage: the
tokenizer, VQ, CLIP, judge, the memory, the neighbour table, RA-CM3 and CM3) and returns
(bundle_dir, memory_dir). Set RACM3_SMOKE_DIR to keep it between sessions: the pipeline
records finished stages in the manifest and skips them, so a rerun costs nothing.
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread for the whole suite, set before numpy or torch load: the test
# workloads are small, and on a shared 2-core CPU spinning worker threads make small
# matmuls up to ~100x slower (see `torch_threads`).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with n torch CPU threads, then restore the previous count.

    The smoke models are tiny, so a second thread buys almost nothing, while on a shared,
    oversubscribed CPU torch's spinning worker threads make each small matmul up to ~100×
    slower (measured: 1,000 64×256 linears take 0.06 s on one thread, 9.6 s on two).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models (see `torch_threads` for why)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def smoke_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from training.pipeline import RECIPES, Pipeline

    root = Path(os.environ.get("RACM3_SMOKE_DIR") or tmp_path_factory.mktemp("smoke"))
    pipe = Pipeline(RECIPES["smoke"], root / "bundle", root / "work", device="cpu",
                    progress=False)
    with torch_threads(1):
        pipe.run()
    return pipe.out, pipe.memory_dir()
