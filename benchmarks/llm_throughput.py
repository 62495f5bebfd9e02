"""Throughput of the generation stage against a server that answers after a fixed latency L.

With N requests in flight and nothing else limiting, a client completes N/L answers per second;
the stage should reach at least 90% of that while committing every answer to the knowledge store.

    python benchmarks/llm_throughput.py                       # L = 0.2 s, N = 8, 32, 64
    python benchmarks/llm_throughput.py --latency-s 0.5 --concurrency 16 128 --rounds 10

The server (kar.knowledge.llm.fake_server) runs in its own process, so that it does not compete
with the client for the interpreter. Each N answers `rounds * N` fresh prompts into a temporary
store, then runs again to check that nothing is sent twice. Prints one row per N: answers/s
(answers stored / seconds of the sending phase, from opening the connection pool to the last
commit: the stage's `elapsed_s`), N/L and their ratio, and the requests the server saw during
the second run (0 expected).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # a progress bar per run would hide the table

from kar.knowledge.llm.openai_chat import OpenAIChat
from kar.knowledge.prompts import PromptRequest
from kar.knowledge.store import KnowledgeStore


def start_server(latency_s: float) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "kar.knowledge.llm.fake_server", "--latency-s", str(latency_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def server_requests(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as response:
        return int(json.load(response)["requests"])


def measure(base_url: str, store_path: Path, n: int, latency_s: float, rounds: int) -> dict:
    requests = [
        PromptRequest(kind="item", raw_id=str(i), prompt=f"N={n} prompt {i}: introduce movie {i}")
        for i in range(rounds * n)
    ]
    llm = OpenAIChat(
        model="bench", base_url=base_url, api_key_env=None, concurrency=n, timeout_s=30.0
    )
    with KnowledgeStore(store_path) as store:
        answers = llm.generate(requests, store)
    report = llm.last_report
    assert report is not None and len(answers) == len(requests) == report.answered
    before = server_requests(base_url)
    with KnowledgeStore(store_path) as store:
        again = llm.generate(requests, store)
    assert again == answers
    rate = report.answered / report.elapsed_s
    return {
        "N": n,
        "prompts": len(requests),
        "seconds": report.elapsed_s,
        "answers_per_s": rate,
        "ideal": n / latency_s,
        "ratio": rate / (n / latency_s),
        "second_run_requests": server_requests(base_url) - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--rounds", type=int, default=20, help="prompts per N = rounds * N")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    server, base_url = start_server(args.latency_s)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [
                measure(base_url, Path(tmp) / f"store-{n}.duckdb", n, args.latency_s, args.rounds)
                for n in args.concurrency
            ]
    finally:
        server.terminate()
        server.wait()
    print(f"L = {args.latency_s} s")
    print(
        f"{'N':>4} {'prompts':>8} {'seconds':>8} {'answers/s':>10} {'N/L':>7} {'ratio':>6} "
        f"{'2nd-run requests':>17}"
    )
    for r in rows:
        print(
            f"{r['N']:>4} {r['prompts']:>8} {r['seconds']:>8.2f} {r['answers_per_s']:>10.1f} "
            f"{r['ideal']:>7.1f} {r['ratio']:>6.3f} {r['second_run_requests']:>17}"
        )


if __name__ == "__main__":
    main()
