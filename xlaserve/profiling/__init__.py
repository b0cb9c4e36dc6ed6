"""`xlaserve profile` internals: `session` drives the runner and engine, `render` draws tables
and plots. The analysis of compiled programs lives in runtime/profile.py, peak rates in
runtime/hardware.py."""

from __future__ import annotations
