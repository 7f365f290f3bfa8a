"""Shared by the benchmark scripts: the timer, the devices to run on and their names, and the
command-line frame (``--devices``, ``--json``, one table per device)."""

import argparse
import json
import statistics
import time

import torch

import commcomp


def parse_devices(spec: str):
    """``"auto"`` (CPU, plus CUDA when present) or a comma list such as ``"cpu,cuda"``."""
    if spec == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(d) for d in spec.split(",")]


def device_label(dev: torch.device) -> str:
    """The GPU's name, or how many CPU threads torch uses."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"


def timer(device: torch.device, fn, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parser(prog: str, doc: str, numel: int) -> argparse.ArgumentParser:
    """The benchmark's parser with ``--numel`` (default ``numel``) and ``--repeat``; add its
    own options, then call :func:`run_devices`."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=numel)
    p.add_argument("--repeat", type=int, default=10)
    return p


def print_table(table: str, args, dev: torch.device, label: str, result: dict) -> None:
    """Print one device's results with ``table``'s three lines: a title (formatted with
    ``dev``, ``name`` (the device's label), ``torch`` (its version), the options in ``args`` and
    the result's fields), the column header, and a row format applied to each result row."""
    title, header, row = table.strip("\n").split("\n")
    fields = {**vars(args), **result, "dev": dev, "name": label, "torch": torch.__version__}
    print("\n" + title.format(**fields))
    print(header)
    for r in result["rows"]:
        print(row.format(**r))


def run_devices(p: argparse.ArgumentParser, argv, run_one, table: str) -> list:
    """Add ``--devices`` and ``--json`` to ``p``, parse ``argv``, and for each device call
    ``run_one(args, device)`` and print its result as ``table`` says (:func:`print_table`);
    write every result to ``--json`` if given. Returns the results."""
    p.add_argument("--devices", default="auto", help="comma list, e.g. cpu,cuda")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = []
    for dev in parse_devices(args.devices):
        if commcomp.ops.backend(dev) != "native":
            print(f"# {dev}: native kernels not built; native and reference would be the same code")
        res = run_one(args, dev)
        results.append(res)
        print_table(table, args, dev, device_label(dev), res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
