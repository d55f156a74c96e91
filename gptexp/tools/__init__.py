"""Tools that measure gptexp rather than use it: the bench (costs against plain PyTorch) and the
GPU check. Their commands are gptexp/bench.py and gptexp/gpucheck.py."""
