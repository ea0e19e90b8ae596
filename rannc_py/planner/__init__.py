"""Planning: cluster presets, the cost model, the layout search and the Plan it returns.

Modules: ``cluster`` (devices, links, presets), ``calibrate`` (the measured
``local`` preset), ``coarsen`` (graph -> blocks), ``chain`` (blocks with
costs), ``cost`` (stage time and memory), ``search`` (the dynamic program),
``plan`` (the Plan data), ``api`` (``rannc_py.plan``), ``viz`` (PNG drawing).
"""
