"""Per-run CPU of one ``moleserve serve`` process: which requests pay for what (BENCHMARKS.md,
"Eighth session: the non-streaming served path's CPU").

    python benchmarks/served_cpu.py [--prompt-len 64 128] [--concurrency 32] [--new-tokens 64] [--server-args ...]

Three prompt sets (the same lengths, a first token of their own), each sent twice in a row, once
non-streaming and once streaming, the order alternating between sets; for each run the server's CPU
seconds over the timed requests per 1000 tokens, and apart from them the client's warm-up request's.
With prefix caching on (the default) the second run of a set reads the first's full KV blocks.
"""

from __future__ import annotations

import argparse
import asyncio

from served import (
    own_prompts,
    process_cpu,
    prompts_for,
    serve_flags,
    served,
    start_server,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[64, 128])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--server-args", default="", help="extra `moleserve serve` flags, space-separated")
    args = ap.parse_args()
    n, nt = args.concurrency, args.new_tokens
    proc, url = start_server(args.threads, serve_flags(max(64, n), args.server_args.split()))
    try:
        base = prompts_for(n, 49152, *args.prompt_len, seed=n + args.prompt_len[0])
        print("| prompt set | run | CPU s / 1000 tokens | warm-up request, CPU s |\n| --- | --- | --- | --- |")
        for s, order in enumerate(((False, True), (True, False), (False, True))):
            prompts = own_prompts(base, s)
            for k, stream in enumerate(order):
                before = process_cpu(proc.pid)[1]
                _wall, tokens, counts, (_, all_s) = asyncio.run(served(url, prompts, nt, stream, pid=proc.pid))
                warm = process_cpu(proc.pid)[1] - before - all_s
                assert tokens == n * nt, (tokens, counts)
                print(f"| {s} | {'streaming' if stream else 'non-streaming'} ({'new prompts' if k == 0 else 'again'}) | "
                      f"{1000 * all_s / tokens:.2f} | {warm:.2f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
