"""Speed of the update codecs (`cmd_fl.codec`) beside one local epoch of the Fashion-MNIST CNN.

Run ``python -m benchmarks.codec_speed [--length N] [--repeats R]`` from the repository root.
For each codec it times `compress` (encode + decode + error feedback: a client's uplink, and
the server's downlink once per round), and `decode` alone (a client's downlink, and the
server's work per reply) on a vector of the model's size, and prints the blob size and the
ratio of a client's codec time per round (one decode and one compress) to one local epoch
with the project's defaults (batch 32, 20000 / 10 = 2000 images per client, random data of
Fashion-MNIST shape).
Timings are wall-clock medians; other processes on the machine slow them down.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from cmd_fl.codec import CODECS, CodecSpec, compress, decode, encode
from cmd_fl.layout import ParameterLayout
from simulations.data import ArrayDataset
from simulations.settings import RunSettings
from simulations.task import build_model, train


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_epoch(images: int, batch_size: int, lr: float, seed: int) -> float:
    """Seconds of one local epoch of the Fashion-MNIST CNN on random data of that shape."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    model = build_model("fashion-mnist", seed=seed)
    start = time.perf_counter()
    train(model, ArrayDataset(x, y, 10), epochs=1, batch_size=batch_size, lr=lr, seed=seed)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and return the measurements.

    Parameters
    ----------
    argv : list[str] | None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``length``, ``epoch_s`` and, per codec, ``compress_s``, ``decode_s`` and ``bytes``.
    """
    defaults = RunSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=None, help="default: the CNN's weights")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per codec (20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    print("$ python -m benchmarks.codec_speed " + shlex.join(shown), flush=True)

    n = args.length
    if n is None:
        n = ParameterLayout.from_module(build_model("fashion-mnist")).n_weights
    images = defaults.train_subset // defaults.num_partitions
    epoch_s = time_epoch(images, defaults.batch_size, defaults.learning_rate, args.seed)
    print(
        f"vector: {n:,} float32; one local epoch ({images} images, batch "
        f"{defaults.batch_size}, {torch.get_num_threads()} torch threads): {epoch_s:.3f} s; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    update = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    residual = (rng.standard_normal(n) * 1e-4).astype(np.float32)
    result: dict[str, Any] = {"length": n, "epoch_s": epoch_s, "codecs": {}}
    header = f"{'codec':<6} {'bytes':>9} {'vs none':>8} {'compress ms':>12} {'decode ms':>10}"
    print(header + f" {'client / epoch':>17}")
    print("-" * (len(header) + 18))
    dense = encode(update, CodecSpec()).size
    for name in CODECS:
        spec = CodecSpec(name)  # defaults: int8 blocks of 256, topk 10 %, error feedback on
        blob = encode(update + residual, spec)
        compress_s = _median_s(partial(compress, update, spec, residual), args.repeats)
        decode_s = _median_s(partial(decode, blob, spec, n), args.repeats)
        result["codecs"][name] = {
            "compress_s": compress_s,
            "decode_s": decode_s,
            "bytes": blob.size,
        }
        print(
            f"{name:<6} {blob.size:>9,} {blob.size / dense:>8.3f} {compress_s * 1e3:>12.3f} "
            f"{decode_s * 1e3:>10.3f} {(compress_s + decode_s) / epoch_s:>17.5f}"
        )
    return result


if __name__ == "__main__":
    main()
