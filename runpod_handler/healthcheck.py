"""Docker HEALTHCHECK: pod mode asks the gateway's /health, load-balancing mode its /ping on PORT_HEALTH,
serverless mode Triton's readiness."""

from __future__ import annotations

import sys
import urllib.request

from anomaly.config import load_settings


def main() -> int:
    s = load_settings()
    if s.runpod_mode == "serverless":
        url = f"http://127.0.0.1:{s.triton_http_port}/v2/health/ready"
    elif s.runpod_mode == "lb":
        url = f"http://127.0.0.1:{s.port_health}/ping"
    else:
        url = f"http://127.0.0.1:{s.api_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return 0 if response.status == 200 else 1  # 204: still starting
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
