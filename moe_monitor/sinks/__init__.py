"""Dashboards a closed window is sent to: one sink per file, each isolated from the others' faults.

- :mod:`moe_monitor.sinks.scalars`: the scalar key scheme, sent through every Lightning logger.
- :mod:`moe_monitor.sinks.tensorboard`: expert-load histograms, heatmaps, custom-scalars layout, alert text.
- :mod:`moe_monitor.sinks.wandb`: the same views for Weights & Biases, plus the events table as it grows, a status,
  one alert per incident and end-of-fit line plots.
- :mod:`moe_monitor.sinks.images`: the layer x expert heatmap both rich sinks draw.
- :mod:`moe_monitor.sinks.console`: incidents, recoveries, knob changes and the run summary for a person at the
  terminal (and ``summary.json``).
"""
