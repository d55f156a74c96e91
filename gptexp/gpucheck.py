"""``python -m gptexp.gpucheck`` (``make gpu-check``): the GPU check of gptexp/tools/gpucheck.py."""

from gptexp.tools.gpucheck import main

if __name__ == "__main__":
    main()
