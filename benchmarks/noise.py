"""Throughput of secure DP noise: ``SecureGenerator.normal`` (ChaCha20 + Box-Muller + 4-sum)
against ``torch.randn`` (Mersenne Twister on CPU, Philox on CUDA: fast, not secure).

    python benchmarks/noise.py                      # one CPU thread, n = 1e4, 1e6, 1e7
    python benchmarks/noise.py --devices cpu cuda   # and the PyTorch twin on a GPU

Every row is timed in the same run as its ``torch.randn`` baseline: ``x randn`` is the
secure generator's median time over randn's (how many times slower). ``twin`` is the
pure-PyTorch ChaCha20 (the CUDA path, and the CPU fallback without ``cryptography``); on CPU
it is timed for reference only, with fewer repeats. Times are the median of ``--repeat``
runs after one warm-up; ``[min, max]`` shows the spread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from commcomp.privacy import csprng
from commcomp.privacy.csprng import SecureGenerator


def _timed(fn, device: torch.device, repeat: int):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocator, kernels, OpenSSL context
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def _row(name: str, n: int, stats, base_median: float) -> str:
    med, lo, hi = stats
    return (f"{name:<28}{n:>12,}{med * 1e3:>11.2f}  [{lo * 1e3:8.2f}, {hi * 1e3:8.2f}]"
            f"{n / med / 1e6:>12.2f}{med / base_median:>9.1f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--twin-repeat", type=int, default=3, help="repeats for the CPU twin (slow)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default: one core)")
    ap.add_argument("--devices", nargs="+",
                    default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    crypto = csprng.cryptography_available()
    cpu_backend = "cryptography (OpenSSL)" if crypto else "torch twin (fallback)"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU thread(s), CPU ChaCha20 backend: {cpu_backend}")
    gen_auto, gen_twin = SecureGenerator(), SecureGenerator(backend="torch")
    for name in args.devices:
        dev = torch.device(name)
        label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        print(f"\n{label}: float32 output")
        print(f"{'generator':<28}{'n':>12}{'median ms':>11}  {'[min, max] ms':^20}"
              f"{'M normals/s':>12}{'x randn':>10}")
        for n in args.sizes:
            base = _timed(lambda n=n, dev=dev: torch.randn(n, device=dev), dev, args.repeat)
            print(_row("torch.randn (not secure)", n, base, base[0]))
            auto = _timed(lambda n=n, dev=dev: gen_auto.normal(n, dev), dev, args.repeat)
            if dev.type == "cpu":
                name = "SecureGenerator (OpenSSL)" if crypto else "SecureGenerator (twin)"
                print(_row(name, n, auto, base[0]))
                twin = _timed(lambda n=n, dev=dev: gen_twin.normal(n, dev), dev, args.twin_repeat)
                print(_row("SecureGenerator, twin", n, twin, base[0]))
            else:
                print(_row("SecureGenerator (twin)", n, auto, base[0]))


if __name__ == "__main__":
    main()
