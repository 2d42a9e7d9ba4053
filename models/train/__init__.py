"""The offline trainer: options, penalty, schedules, data, steps, run state, distributed training."""
