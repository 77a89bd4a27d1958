"""fastrlhf benchmarks (installed as fastrlhf.benchmarks; `fastrlhf bench NAME` or `python -m benchmarks.NAME`)."""
