"""Entry points, sweeps, training, throughput, FLOP accounting and reports."""
