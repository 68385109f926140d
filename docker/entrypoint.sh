#!/bin/sh
# `docker run racm3 serve --role gateway ...` and any other racm3 subcommand run `racm3`;
# anything else (a shell, python) runs as given. The list is racm3's subcommands
# (tests/test_container_path.py keeps the two in step).
set -eu
case "${1:-}" in
    serve|build-index|train|eval|bench|--help)
        exec racm3 "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
