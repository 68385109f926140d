#!/bin/sh
# `docker run racm3 serve --role gateway ...` and any other racm3 subcommand run `racm3`;
# anything else (a shell, python) runs as given.
set -eu
case "${1:-}" in
    serve|build-index|train|eval|bench|generate|--help)
        exec racm3 "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
