"""Run under ``mpiexec -n 4``: the sequential-coding round engine over mpi4py (rank 0 coordinates,
3 workers) decodes every job exactly, with injected stragglers, for SR-SGC and M-SGC."""

import sys

import numpy as np


def main() -> int:
    from mpi4py import MPI

    from commcomp.coding import stragglers as st
    from commcomp.coding.engine import RoundEngine, digits_sweep, reference_params
    from commcomp.coding.simulate import simulate

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    cm = digits_sweep(models=3, hidden=8)
    J = 8
    d = st.bernoulli(J + 4, world - 1, 0.2, np.random.default_rng(5), base=0.05, slow=6.0)
    for scheme, params in (("srsgc", {"B": 1, "W": 2, "lambd": 1}), ("msgc", {"B": 1, "W": 2, "lambd": 1})):
        eng = RoundEngine(cm, scheme, params, n_jobs=J, delays=d, transport="mpi", timeout=60)
        res = eng.run()
        if res is not None:
            ref = reference_params(cm, eng.layout.N, J, eng.layout.scheme.T)
            for got, want in zip(res.model_params, ref):
                assert float((got - want).abs().max() / want.abs().max()) < 1e-12, scheme
            sim = simulate(d, scheme, params, n_jobs=J, mu=1.0)
            np.testing.assert_array_equal(res.missing, sim.stragglers)
            assert res.num_waits == sim.num_waits
        comm.Barrier()
    print(f"{rank}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
