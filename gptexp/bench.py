"""``python -m gptexp.bench`` (``make bench``): gptexp's costs against plain PyTorch, in
gptexp/tools/bench/."""

from gptexp.tools.bench.command import main

if __name__ == "__main__":
    main()
