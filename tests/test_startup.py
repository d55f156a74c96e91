"""What a run's process spends outside its steps: the compiler is imported only by runs that
compile, and the collector leaves the imported modules alone (gptexp.training.optim,
gptexp.training.speed)."""

from __future__ import annotations

import subprocess
import sys

import torch

from gptexp.training.optim import AdamW
from tests.conftest import FAST, ROOT, subprocess_env

# Runs ``python -m gptexp.train`` in this child and, after everything else at exit (atexit
# runs last what was registered first), says what the process imported and froze.
REPORT_AT_EXIT = """
import atexit, gc, runpy, sys
atexit.register(lambda: print(
    "dynamo", "torch._dynamo" in sys.modules, "sympy" in sys.modules,
    "frozen", gc.get_freeze_count(),
))
sys.argv = ["gptexp.train", *sys.argv[1:]]
runpy.run_module("gptexp.train", run_name="__main__")
"""


def run_reporting(tmp_path, *overrides: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", REPORT_AT_EXIT, *FAST, *overrides, f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    words = result.stdout.split("dynamo", 1)[1].split()
    return {"dynamo": words[0], "sympy": words[1], "frozen": words[3]}


def test_an_eager_run_never_imports_the_compiler_and_freezes_its_imports(tmp_path):
    """torch.optim imports torch._dynamo (1.2-1.5 s, with sympy) on an optimizer's first use;
    a run with evaluation, checkpoints and its sample never does. Its entry point freezes the
    imported objects (hundreds of thousands with torch) so that no collection walks them."""
    report = run_reporting(tmp_path, "training.compile=false", "training.max_steps=6")
    assert report["dynamo"] == "False" and report["sympy"] == "False"
    assert int(report["frozen"]) > 100_000


def test_gptexp_adamw_steps_exactly_as_torch_adamw():
    """Same update, same state, same state_dict, and each loads the other's state."""

    def model_and_batch() -> tuple[torch.nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), torch.randn(
            5, 8
        )

    models, optimizers = [], []
    for cls in (torch.optim.AdamW, AdamW):
        model, x = model_and_batch()
        groups = [
            {"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
            {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0},
        ]
        optimizer = cls(groups, lr=1e-2, betas=(0.9, 0.95))
        for _ in range(5):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        models.append(model)
        optimizers.append(optimizer)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    theirs, ours = (o.state_dict() for o in optimizers)
    assert theirs["param_groups"] == ours["param_groups"]
    for key, state in theirs["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ours["state"][key][name]), name
    optimizers[1].load_state_dict(theirs)
    optimizers[0].load_state_dict(ours)
