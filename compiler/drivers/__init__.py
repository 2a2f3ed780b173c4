"""Drivers: the compile, tune and demo commands' orchestration.

They compose the stages and own the options dataclasses; no stage module imports a driver
(docs/design.md).
"""
