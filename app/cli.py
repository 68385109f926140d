"""`racm3`: one CLI for serving, building the memory, training, evaluation and benchmarks.

Heavy imports (torch, faiss, open_clip) happen inside each command so that
`racm3 --help` stays instant.
"""

from __future__ import annotations

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


# --- build-index -----------------------------------------------------------------------


# --- train / eval ----------------------------------------------------------------------


# --- serve / generate ------------------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
