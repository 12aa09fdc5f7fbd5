"""StepContext: step index from timesteps (CFG calls share one), new generations, scheduler cross-check."""
import torch

from vidattn import StepContext


class _Pipe:
    def __init__(self, timesteps):
        self.scheduler = type("Sched", (), {"timesteps": torch.tensor(timesteps)})()


def _observe(ctx, values):
    seen = []
    for t in values:
        ctx.observe(torch.tensor([t, t]), (2, 3, 4))
        seen.append((ctx.step, ctx.branch))
    return seen


def test_counts_distinct_timesteps_and_cfg_branches():
    ctx = StepContext()
    assert _observe(ctx, (999.0, 999.0, 800.0, 800.0, 400.0, 400.0)) == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert ctx.grid == (2, 3, 4) and ctx.generations == 1
    ctx.observe(torch.tensor(999.0), (2, 3, 4))  # a move against the schedule starts a new generation
    assert (ctx.step, ctx.generations) == (0, 2)


def test_increasing_schedules_count_too():
    """Mochi's timesteps increase: the direction is learnt, a jump back is a new generation."""
    ctx = StepContext()
    assert [s for s, _ in _observe(ctx, (0.0, 0.0, 20.0, 20.0, 60.0, 60.0))] == [0, 0, 1, 1, 2, 2]
    _observe(ctx, (0.0, 20.0))
    assert (ctx.step, ctx.generations) == (1, 2)


def test_scheduler_index_wins_tolerates_bf16_and_gives_num_steps():
    pipe = _Pipe([1000.0, 750.0, 500.0, 250.0])
    ctx = StepContext(pipeline=pipe)
    ctx.observe(torch.tensor([500.0]), None)  # first call seen mid-schedule (e.g. a resumed loop)
    assert ctx.step == 2 and ctx.num_steps == 4
    ctx.observe(torch.tensor(250.0).to(torch.bfloat16), None)
    assert ctx.step == 3
    ctx.observe(1000.0, None)  # back to the start: a new generation
    assert (ctx.step, ctx.generations) == (0, 2)
    pipe.scheduler = type("Sched", (), {"timesteps": torch.tensor([900.0, 100.0])})()  # swapped scheduler
    assert ctx.num_steps == 2
    ctx.observe(100.0, None)
    assert ctx.step == 1


def test_no_timestep_keeps_step():
    ctx = StepContext()
    ctx.observe(None, (1, 1, 1))
    assert ctx.step == -1 and ctx.calls == 1
