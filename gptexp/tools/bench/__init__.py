"""``python -m gptexp.bench``: gptexp's costs as ratios to plain PyTorch on the same machine.

- :mod:`gptexp.tools.bench.plan`: what to measure at which size (full or ``--quick``), on which CPU,
  and what the machine cannot do natively (skipped, with the reason);
- :mod:`gptexp.tools.bench.measure`: the measurements (subprocesses, alternated with their
  yardsticks); :mod:`gptexp.tools.bench.probe` times the phases of a gptexp command from inside it;
- :mod:`gptexp.tools.bench.report`: medians, targets, the JSON file and the printed table;
- ``plain_train.py``: the standalone plain script gptexp is compared with (it imports nothing
  of gptexp).

Nothing is imported here: the probe runs inside the commands it times.
"""
