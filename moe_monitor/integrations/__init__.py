"""Integrations with training frameworks other than Lightning, each a thin layer over :class:`moe_monitor.Watcher`.

- :mod:`moe_monitor.integrations.transformers`: :class:`MoETrainerCallback` for the Hugging Face ``Trainer`` and
  the TRL trainers built on it.
"""
