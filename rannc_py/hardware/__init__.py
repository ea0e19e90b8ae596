"""What the job runs on: devices, links and clusters, their presets, and the measured ``local`` preset.

``cluster`` holds :class:`Device`, :class:`Link`, :class:`Cluster`, the
presets and the preset-string parser; ``calibrate`` measures this machine for
the ``local`` preset (cached on disk). Profiling, planning and the runtime all
read these descriptions; nothing here knows about models or plans.
"""
