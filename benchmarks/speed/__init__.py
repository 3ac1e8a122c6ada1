"""Speed and memory benchmarks (one script per measurement); results in benchmarks/results/."""
