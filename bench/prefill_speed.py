"""
Prefill, decode and save speed of a generated model at a few prompt sizes (issue 24): one llama-server
(-np 1, --cache-ram 0), a new prompt of each size, llama.cpp's own `timings`, then a slot save.

    python -m bench.prefill_speed --model kv30b --sizes 1024,2048,4096 --threads 1
    python -m bench.prefill_speed --model kv7b --sizes 1024,2048 --threads 2 -- -fa off   # extra llama-server flags

One token per prompt character (the generated models' tokenizer is byte-level).  Prints one line a size.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

from proxycache.embedded import LlamaServerSpec, command, free_port
from proxycache.testing.http import http
from proxycache.tinymodel import PRESETS, ensure_model

DEFAULT_MODELS = Path.home() / ".cache/proxycache/test-models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="kv30b", help="one of " + ", ".join(PRESETS))
    parser.add_argument("--sizes", default="1024,2048", help="prompt sizes in tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--predict", type=int, default=8, help="tokens to decode after each prompt")
    parser.add_argument("--binary", default=None, help="llama-server binary (default: the one llamabin built)")
    parser.add_argument("extra", nargs="*", help="more llama-server flags, after --")
    args = parser.parse_args()
    if args.binary is None:
        from proxycache.testing.llamabin import binary_path

        args.binary = str(binary_path())
    sizes = [int(s) for s in args.sizes.split(",")]
    model = ensure_model(DEFAULT_MODELS, PRESETS[args.model])
    with tempfile.TemporaryDirectory(prefix="prefill-speed-") as workdir:
        spec = LlamaServerSpec(model=str(model), slots=1, ctx_per_slot=max(sizes) + 512, save_dir=workdir,
                               port=free_port(), threads=args.threads, cache_ram_mib=0, binary=args.binary)
        child = subprocess.Popen([*command(spec), *args.extra], stdout=subprocess.DEVNULL,
                                 stderr=open(Path(workdir) / "llama.log", "w"))
        try:
            for _ in range(1200):
                try:
                    if http("GET", spec.url + "/health", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            rng = random.Random(1)
            for size in sizes:
                prompt = "".join(rng.choice("abcdefghij ") for _ in range(size))
                load = os.getloadavg()[0]
                body = {"prompt": prompt, "n_predict": args.predict, "cache_prompt": False}
                timings = http("POST", spec.url + "/completion", body, timeout=3600)[2]["timings"]
                saved = http("POST", spec.url + "/slots/0?action=save", {"filename": "speed.bin"}, timeout=3600)[2]
                print(
                    f"{args.model} -t {args.threads} {' '.join(args.extra)}: {timings['prompt_n']} tokens prefilled"
                    f" in {timings['prompt_ms'] / 1000:.2f} s ({timings['prompt_per_second']:.0f} tokens/s),"
                    f" {timings['predicted_n']} decoded in {timings['predicted_ms'] / 1000:.2f} s,"
                    f" save {saved['n_written'] / 1e6:.0f} MB in {saved['timings']['save_ms'] / 1000:.2f} s;"
                    f" load average {load:.1f}",
                    flush=True,
                )
        finally:
            child.terminate()
            child.wait()


if __name__ == "__main__":
    main()
