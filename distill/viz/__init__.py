"""Pictures of runs: training curves (``curves``), one image seen by the distillation (``show_*``)
and the run comparison table (``compare``). Drawn with matplotlib's Agg canvas on ``Figure`` objects
(no pyplot: nothing global is switched, a user's notebook backend stays as it was)."""
