"""Container health: ready (or degraded) on /readyz. Exit 0 healthy, 1 not.

The port comes from RACM3_HEALTH_PORT (8000 gateway/embedded, 8001 retriever, 8002
generator). Standard library only: the slim image has no curl.
"""

import json
import os
import sys
import urllib.error
import urllib.request

port = int(os.environ.get("RACM3_HEALTH_PORT", "8000"))
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
        status = json.load(response).get("status")
except (urllib.error.URLError, OSError, ValueError) as exc:
    print(f"not ready: {exc}")
    sys.exit(1)
print(status)
sys.exit(0 if status in ("ready", "degraded") else 1)
