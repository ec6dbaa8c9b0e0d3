"""What reusing a cached prefix costs against computing it (engine only, real model).

For a prefix of N tokens (--lengths, default 128, 512, 1024): the time to copy its blocks
from the prefix cache into a request's slot (PrefixCache.copy_into), to store
them (PrefixCache.store), and to prefill the same N tokens in passes of
--prefill-chunk-size, as a request without the cache would. Medians of
--repeats runs. A benchmark, not a test: note the machine's load.

    python bench/prefix_cache_copy.py [--kv-cache-dtype float32] [--quantization int8]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.engine_decode import _median_ms  # noqa: E402
from service.config import default_model_path  # noqa: E402
from service.engine.config import EngineConfig  # noqa: E402
from service.engine.loader import load_model  # noqa: E402
from service.engine.model_runner import ModelRunner  # noqa: E402
from service.engine.prefix_cache import BLOCK_SIZE, PrefixCache, block_keys  # noqa: E402


def median_ms(run, repeats: int) -> float:
    return round(_median_ms(run, repeats), 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=default_model_path())
    p.add_argument("--quantization", default="int8")
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--prefill-chunk-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lengths", default="128,512,1024", help="prefix lengths in tokens (default: %(default)s)")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    runner = ModelRunner(
        load_model(args.model),
        EngineConfig.defaults(
            max_batch_size=2, max_model_len=2048, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype
        ),
    )
    tokens = list(range(1000, 1000 + max(lengths)))
    result = {
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "loadavg_before": os.getloadavg(),
    }
    with torch.inference_mode():
        for length in lengths:
            blocks = length // BLOCK_SIZE
            keys = block_keys(tokens, blocks)
            cache = PrefixCache(runner, blocks)

            def prefill(length=length):
                for start in range(0, length, args.prefill_chunk_size):
                    runner.prefill(0, tokens[start : min(length, start + args.prefill_chunk_size)], start)

            result[f"prefill_ms_{length}"] = median_ms(prefill, args.repeats)

            # Into an empty store each time (first-touch page faults included, as when the cache fills).
            def store(blocks: int = blocks, keys: list[bytes] = keys) -> None:
                PrefixCache(runner, blocks).store(keys, 0)

            result[f"store_ms_{length}"] = median_ms(store, args.repeats)
            cache.store(keys, 0)
            cache.match(keys)
            result[f"copy_in_ms_{length}"] = median_ms(functools.partial(cache.copy_into, keys, 1), args.repeats)
    result["loadavg_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
