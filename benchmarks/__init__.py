"""Benchmarks for partitioner: suites as data, one runner, results with hardware and versions.

``python -m benchmarks.run --suite quick`` runs a suite (`benchmarks.suites`) and writes a
JSON result, a Markdown summary and plots under ``benchmarks/results/<suite>/``.

- `suites`     the suites: models, device sets, modes, scaling series, accuracy cases (data)
- `models`     benchmark-only models (a ResNet-style CNN, deep chain and skip MLPs, GPT-2 mini)
- `baselines`  what users do instead: Accelerate's device maps, DeepSpeed's uniform and
               parameter-balanced stages, torchgpipe's time balance (pure, no torch)
- `cases`      one job of a suite: compare plans, time the planner, measure on this CPU
- `worker`     runs one job in its own process (so peak memory is per job)
- `run`        the runner: jobs -> result JSON -> summary, plots, targets
- `targets`    the figures the suite reports against, pass or fail
- `schema`     the result file's schema and its validator
- `report`     Markdown tables and matplotlib plots
"""
