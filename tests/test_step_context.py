"""StepContext: step index from timesteps (CFG calls share one), new generations, scheduler cross-check."""
import torch

from vidattn import StepContext


def test_counts_distinct_timesteps_and_cfg_branches():
    ctx = StepContext()
    seen = []
    for t in (999.0, 999.0, 800.0, 800.0, 400.0, 400.0):
        ctx.observe(torch.tensor([t, t]), (2, 3, 4))
        seen.append((ctx.step, ctx.branch))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert ctx.grid == (2, 3, 4) and ctx.generations == 1
    ctx.observe(torch.tensor(999.0), (2, 3, 4))  # a rise starts a new generation
    assert (ctx.step, ctx.generations) == (0, 2)


def test_scheduler_index_wins_and_gives_num_steps():
    class Sched:
        timesteps = torch.tensor([1000.0, 750.0, 500.0, 250.0])

    ctx = StepContext(scheduler=Sched())
    ctx.observe(torch.tensor([500.0]), None)  # first call seen mid-schedule (e.g. a resumed loop)
    assert ctx.step == 2 and ctx.num_steps == 4
    ctx.observe(250.0, None)
    assert ctx.step == 3


def test_no_timestep_keeps_step():
    ctx = StepContext()
    ctx.observe(None, (1, 1, 1))
    assert ctx.step == -1 and ctx.calls == 1
