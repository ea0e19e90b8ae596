"""What the job runs on: devices, links and clusters, their presets, and the measured ``local`` preset.

``device`` holds the records :class:`Device` and :class:`Link`; ``calibrate``
measures this machine (compute, memory bandwidth, the MPI link between two
local ranks; cached on disk); ``cluster`` holds :class:`Cluster`, the presets
and the preset-string parser, and builds the ``local`` cluster from
``calibrate``'s figures. Profiling, planning and the runtime all read these
descriptions; nothing here knows about models or plans.
"""
