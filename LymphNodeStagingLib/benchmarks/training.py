"""Benchmark of TS1 training: patches per second of full training steps (sampling, augmentation, forward, backward,
optimiser step) with the paper's reference network."""

from __future__ import annotations

import argparse

HELP = "TS1 training throughput: patches per second (reference network unless --small)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (default 3)")
    parser.add_argument("--small", action="store_true", help="the small network on 32^3 patches")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu, gpu (or cuda, gpu:N) or auto (default cpu)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision on a GPU (default on)")
    parser.add_argument("--instances", type=int, default=1, metavar="K",
                        help="patches per station (multiple-instance bags; the batch holds --batch-size bags)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..classifier.model import ModelConfig
    from ..io.files import peak_memory_mb
    from ..runtime import parse_device
    from ..training.loops import measure_ts1_throughput

    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(args.device).torch  # a GPU that torch does not see is refused here
    config = ModelConfig.small(32, instances=args.instances) if args.small else ModelConfig(instances=args.instances)
    result = measure_ts1_throughput(config, batch_size=args.batch_size, steps=args.steps, device=device,
                                    augment=not args.no_augment, amp=args.amp)
    return {"network": "small-32" if args.small else "reference-64", "torch_threads": torch.get_num_threads(),
            **result, "peak_memory_mb": round(peak_memory_mb(), 1)}
