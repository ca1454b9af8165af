"""Front-end cost per request, scaled by prompt length: what a client waits for outside the
engine's iterations (HTTP, JSON, chat templating, tokenisation), measured on our emulated
engine with its engine time switched off (`time_scale` 0), so every millisecond is front end.

Streams `/v1/chat/completions` requests with text prompts of several lengths to the engine
(its own process, loopback, one kept-alive connection), takes the median time to the first
streamed token per length, and fits fixed + per-prompt-token by least squares; prints the
fit next to `scheduler.engine_model.FrontEndCost()` (the packaged default, the baseline).
The router's own added latency is measured by bench/router_overhead.py (docs/benchmarks.md).

    python bench/front_end_cost.py [--samples 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import httpx
import numpy as np

from scheduler.engine_model import FrontEndCost
from sim.fidelity import engines_in_subprocess
from sim.textgen import count_tokens

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def prompt_of(tokens: int) -> str:
    words = [WORDS[i % len(WORDS)] + str(i % 97) for i in range(tokens)]
    text = " ".join(words)
    while count_tokens(text) > tokens:
        words.pop()
        text = " ".join(words)
    return text


def median_first_token_ms(client: httpx.Client, url: str, text: str, samples: int) -> float:
    times = []
    body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": text}], "max_tokens": 2, "stream": True}
    for _ in range(samples):
        start = time.perf_counter()
        with client.stream("POST", url, json=body) as response:
            for line in response.iter_lines():
                if '"content":' in line:
                    break
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[3:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--lengths", default="16,256,1024,4096,16384")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    spec = {"gpu": "A100-80GB", "model": "llama-3-8b", "instance_id": "fe", "time_scale": 0.0}
    rows = []
    with engines_in_subprocess([spec]) as endpoints, httpx.Client(timeout=30) as client:
        url = endpoints[0].base_url + "/v1/chat/completions"
        for tokens in lengths:
            text = prompt_of(tokens)
            rows.append((count_tokens(text), median_first_token_ms(client, url, text, args.samples)))
    x = np.array([[1.0, t] for t, _ in rows])
    y = np.array([ms for _, ms in rows])
    (fixed_ms, per_token_ms), *_ = np.linalg.lstsq(x, y, rcond=None)
    default = FrontEndCost()
    print(f"{'prompt tokens':>13} {'median TTFT ms':>15} {'fit ms':>8} {'packaged ms':>12}")
    for tokens, ms in rows:
        print(f"{tokens:>13} {ms:>15.2f} {fixed_ms + per_token_ms * tokens:>8.2f} {default.time_s(tokens) * 1e3:>12.2f}")
    print(f"fit: {fixed_ms:.3f} ms + {per_token_ms * 1e3:.3f} us per prompt token "
          f"(packaged FrontEndCost: {default.fixed_s * 1e3:.3f} ms + {default.s_per_prompt_token * 1e6:.3f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
