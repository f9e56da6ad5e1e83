"""Entry points, sweeps, training, throughput, FLOP accounting and reports."""
from bench.heap import configure_heap
from bench.threads import configure_openmp

configure_openmp()  # before anything imports torch: OpenMP's spin-waiting bounded (bench/threads.py)
configure_heap()  # large tensors recycled, not mapped afresh per op (bench/heap.py)
