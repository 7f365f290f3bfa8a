"""Regenerate golden_authors.json by running the authors' own simulator files.

The authors' repository is mamaj/Sequential-Gradient-Coding-2; their round logic lives in
``2_find_runtimes/``. The final version of every file used here is at commit fab1280 (2022-11-11,
"after submission"); nothing in those files changed after it. Check it out and point ``--authors``
at its ``2_find_runtimes`` folder:

    git clone https://github.com/mamaj/Sequential-Gradient-Coding-2 sgc && git -C sgc checkout fab1280
    python tests/coding/data/make_golden_authors.py --authors sgc/2_find_runtimes

The script imports ``gradient_coding.py``, ``selective_repeat_sgc.py``, ``multiplexed_sgc.py`` and
``no_coding.py`` unchanged and applies the load shift of their ``find_runtime.py``
(``delays = trace + (load - trace_load) * base_comp``; runtime = ``durations.sum()``). Per case it
stores:

* ``runtime``/``round_durations``/``num_waits``: what commcomp's simulator must give with its
  defaults. For GC that is their GC(s + 1) on delays shifted at load (s + 1) / n (our one
  deliberate correction: GC moves on with at most s stragglers; theirs with fewer than s);
  for the other schemes their code as is.
* ``authors_runtime``/``authors_round_durations``/``authors_num_waits``: their code as is (GC(s)
  included), which commcomp reproduces with ``simulate(..., authors=True)``.
* SR-SGC only, ``without_exemption_runtime``: their SR-SGC with its exemption switched off
  (``stragglers(..., exemption=False)``), so the golden file shows which cases exercise it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from commcomp.coding import stragglers as st  # noqa: E402

COMMIT = "fab1280118bd3e96d93f4d6be2f3f9fd5b3bb3e4"

SETTINGS = [  # trace, trace_load, n_jobs, mu, base_comp
    ("Canada-w256-r20-load0_250-b2048-desktop.npz", 0.25, 10, 1.0, 2.2013),
    ("Sydney-w256-r20-load0_000-b256-est-mbp2.npz", 0.0, 10, 0.5, 1.0),
    ("London-w256-r10-load0_250-b256-est-mbp.npz", 0.25, 5, 1.0, 2.0),
]
GC_S = [0, 1, 3, 6, 14, 120]
BWL = [(1, 2, 4), (1, 2, 8), (2, 3, 10), (1, 3, 30), (2, 5, 60), (3, 4, 8), (1, 2, 200),
       (1, 3, 5), (1, 3, 12), (1, 5, 20), (2, 3, 40), (1, 4, 60)]
MSGC_BWL = [(1, 2, 4), (1, 2, 8), (2, 3, 10), (1, 3, 30), (2, 4, 60), (3, 5, 12), (1, 2, 200), (1, 3, 5)]


def _load(folder: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"authors_{name}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(Model, params, d, trace_load, n_jobs, mu, base_comp, load=None):
    n = d.shape[1]
    load = Model.normalized_load(n, *params) if load is None else load
    delays = d.T + (load - trace_load) * base_comp
    m = Model(n, *params, n_jobs, mu, delays)
    m.run()
    assert (m.durations >= 0).all()
    return m, float(m.durations.sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--authors", required=True, help="their 2_find_runtimes folder at commit fab1280")
    ap.add_argument("--out", default=str(Path(__file__).parent / "golden_authors.json"))
    a = ap.parse_args(argv)
    folder = Path(a.authors)
    GC = _load(folder, "gradient_coding").GradientCoding
    SR = _load(folder, "selective_repeat_sgc").SelectiveRepeatSGC
    MS = _load(folder, "multiplexed_sgc").MultiplexedSGC
    NC = _load(folder, "no_coding").NoCoding

    class SRNoExemption(SR):
        def stragglers(self, window, exemption=True):
            return super().stragglers(window, exemption=False)

    cases = []
    synthetic = {  # small straggler models whose durations are stored in the case itself
        "bernoulli-n16-p0.15": st.bernoulli(30, 16, 0.15, np.random.default_rng(1), base=1.0, slow=3.0),
        "ge-n16": st.gilbert_elliott(30, 16, 0.08, 0.5, np.random.default_rng(2), base=1.0, slow=3.0),
    }
    settings = list(SETTINGS) + [(k, 0.0, 20, 1.0, 0.5) for k in synthetic]
    for trace, trace_load, n_jobs, mu, base_comp in settings:
        d = synthetic[trace] if trace in synthetic else st.load_trace(st.SHIPPED_DIR / trace).durations
        n = d.shape[1]
        common = dict(trace=trace, trace_load=trace_load, n_jobs=n_jobs, mu=mu, base_comp=base_comp)
        if trace in synthetic:
            common["durations"] = d.tolist()
        runs = [("uncoded", {}, NC, ())]
        runs += [("gc", {"s": s}, GC, (s,)) for s in GC_S if s + 1 <= n]
        runs += [("srsgc", {"B": B, "W": W, "lambd": la}, SR, (B, W, la)) for B, W, la in BWL
                 if la <= n and -(-B * la // (W - 1 + B)) < n]
        runs += [("msgc", {"B": B, "W": W, "lambd": la}, MS, (B, W, la)) for B, W, la in MSGC_BWL if la <= n]
        for scheme, params, Model, args in runs:
            if scheme == "gc":  # ours tolerates <= s: their GC(s + 1) at our load (s + 1) / n
                load = (args[0] + 1) / n
                m2, rt2 = _run(Model, (args[0] + 1,), d, trace_load, n_jobs, mu, base_comp, load=load)
                case = dict(common, scheme=scheme, params=params, load=load, T=0, runtime=rt2,
                            num_waits=int(m2.num_waits), round_durations=[float(x) for x in m2.durations])
                if args[0] >= 1:  # their GC(0) raises: "< 0 stragglers" never holds, nothing decodes
                    m, rt = _run(Model, args, d, trace_load, n_jobs, mu, base_comp)
                    case.update(authors_runtime=rt, authors_num_waits=int(m.num_waits),
                                authors_round_durations=[float(x) for x in m.durations])
                cases.append(case)
                continue
            if n_jobs + Model.delay(*args) > d.shape[0]:
                continue  # the trace is too short for this delay
            m, rt = _run(Model, args, d, trace_load, n_jobs, mu, base_comp)
            case = dict(common, scheme=scheme, params=params, load=float(m.load), T=int(m.T),
                        authors_runtime=rt, authors_num_waits=int(m.num_waits),
                        authors_round_durations=[float(x) for x in m.durations])
            case.update(runtime=rt, num_waits=int(m.num_waits), round_durations=case["authors_round_durations"])
            if scheme == "uncoded":
                case["num_waits"] = case["authors_num_waits"] = 0  # theirs counts every round; ours none
            if scheme == "srsgc":
                _, rt3 = _run(SRNoExemption, args, d, trace_load, n_jobs, mu, base_comp)
                case["without_exemption_runtime"] = rt3
            cases.append(case)
    exempt = sum(1 for c in cases if "without_exemption_runtime" in c and c["without_exemption_runtime"] != c["runtime"])
    note = (f"Produced by tests/coding/data/make_golden_authors.py, which runs the authors' own files "
            f"(mamaj/Sequential-Gradient-Coding-2, 2_find_runtimes/gradient_coding.py, selective_repeat_sgc.py, "
            f"multiplexed_sgc.py, no_coding.py, all at their final commit {COMMIT}) unchanged, with the load shift "
            f"of their find_runtime.py. 'runtime' is what commcomp gives by default (GC: their GC(s + 1) at load "
            f"(s + 1)/n, our one deliberate correction); 'authors_runtime' is their code as is (commcomp: "
            f"authors=True). {exempt} SR-SGC cases change when the exemption (b6ee48f) is switched off.")
    Path(a.out).write_text(json.dumps({"note": note, "commit": COMMIT, "cases": cases}) + "\n")
    print(f"{len(cases)} cases, {exempt} exercise the SR-SGC exemption -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
