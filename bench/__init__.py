"""Entry points, sweeps, training, throughput, FLOP accounting and reports."""
from bench.threads import configure_openmp

configure_openmp()  # before anything imports torch: OpenMP's spin-waiting bounded (bench/threads.py)
