"""Pure pipeline simulation: stage costs and a schedule -> step time, bubbles, memory, timeline.

`simulate` plays one training step of GPipe, 1F1B or interleaved 1F1B over stages that
may be replicated (data parallel inside a stage) on devices of different speeds;
`closed_form` gives the step time without playing it where a formula is exact; `render`
draws the result as text or as a Gantt chart, `chrome_trace` writes it for Perfetto and
chrome://tracing. No torch here: the planner checks its
objective against this, with plain numbers.
"""

from partitioner.simulate.chrome_trace import chrome_trace, write_chrome_trace
from partitioner.simulate.closed_form import (
    gpipe_step_time,
    ideal_bubble_fraction,
    uniform_step_time,
)
from partitioner.simulate.data import (
    Event,
    EventKind,
    PipelineSchedule,
    RankTimeline,
    StageCost,
    Timeline,
)
from partitioner.simulate.engine import simulate
from partitioner.simulate.render import ascii_timeline, gantt_figure, render_timeline
from partitioner.simulate.schedules import (
    Action,
    peak_inflight_microbatches,
    rank_actions,
)

__all__ = [
    "simulate",
    "StageCost",
    "PipelineSchedule",
    "Timeline",
    "RankTimeline",
    "Event",
    "EventKind",
    "Action",
    "rank_actions",
    "peak_inflight_microbatches",
    "gpipe_step_time",
    "uniform_step_time",
    "ideal_bubble_fraction",
    "ascii_timeline",
    "render_timeline",
    "gantt_figure",
    "chrome_trace",
    "write_chrome_trace",
]
