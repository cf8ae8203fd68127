"""Calibrating SPOT's predictors on a user's images (`calibrate`): the trainer and its loop, the run's log and its
schedule, and the processes it runs on under torchrun. May import anything below `cli`; imported by `cli`, the
package's public API and the recipes.
"""
