"""The benchmark's pieces run on the tiny config and report what they claim (no timing assertions)."""

from configs import tiny
from mmdiff_jax import bench


def test_bench_pieces_on_the_tiny_config():
    config = tiny.get_config()
    q = bench.bench_q_sample(config, batch=8)
    assert q["t_1"]["flops"] == q["t_T"]["flops"] > 0  # closed form: the same cost at t = 1 and t = T
    s = bench.bench_sampler(config, num_steps=3, batch=8)
    assert s["scan_samples_per_s"] > 0 and s["python_loop_samples_per_s"] > 0
    assert s["scan_vs_loop_max_abs_diff"] < 1e-5  # the loop runs the very step the scan runs
    t = bench.bench_train(config, steps=2)
    assert t["flops_per_step"] > 0 and t["one_device"]["devices"] == 1 and t["all_devices"]["devices"] == 8
    assert t["one_device"]["step_ms"] > 0 and t["batch"] == 16
