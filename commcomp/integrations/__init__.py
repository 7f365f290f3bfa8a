"""Adapters to other engines, imported on demand (commcomp loads without them):
:mod:`commcomp.integrations.mpi` (mpi4py: compressed all-reduce for loops that use MPI
directly) and :mod:`commcomp.integrations.horovod` (ternary and sketch compressors in Horovod's
``Compression`` interface; build Horovod with ``launch/install_horovod.sh``)."""
