"""The run engine and the command-line tools around it.

The code reads bottom-up: a module imports only from its own layer or the ones below it (checked by
tests/test_layers.py, every import in the source, lazy ones included):

  architectures   the models, their counts and sizing (architectures/)
  tasks           data, task runners and metrics (tasks/)
  engine          one run: the config path (config), the Hydra app (run), the trainer (train), the latency
                  probe (latency), results files, threads, timing, parallelism, tracking
  tools           what users call: make sweep, sizes, throughput, profile, contention, plots, paper, eval, the
                  kernel and layer benchmarks, the attention-head reader
"""
from bench.threads import configure_openmp

# (layer, modules): a name ending in ".*" is a package and everything in it; others are exact module names
LAYERS = (
    ("architectures", ("architectures", "architectures.*")),
    ("tasks", ("tasks", "tasks.*")),
    ("engine", ("bench", "bench.config", "bench.fingerprint", "bench.run", "bench.train", "bench.latency", "bench.results", "bench.faults",
                "bench.threads", "bench.denormals", "bench.heap", "bench.timing", "bench.hardware", "bench.distributed",
                "bench.tracking")),
    ("tools", ("bench.sweep", "bench.sizes", "bench.throughput", "bench.contention", "bench.report", "bench.plots",
               "bench.paper", "bench.gaps", "bench.published", "bench.harness", "bench.attention_heads",
               "bench.ttt_kernel_speed", "bench.ttt_layer_speed", "bench.mamba_scan_speed",
               "bench.kernel_compile_check", "bench.gpu_report", "bench.step_profile")),
)

configure_openmp()  # before anything imports torch: OpenMP's spin-waiting bounded (bench/threads.py)
