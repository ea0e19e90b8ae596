"""Planning: the cost model, the layout search and the Plan it returns.

Modules: ``chain`` (blocks with costs), ``cost`` (stage time and memory),
``search`` (the dynamic program), ``baselines`` (the split rules of other
systems, as seeds and yardsticks), ``plan`` (the Plan data), ``api``
(``rannc_py.plan``), ``viz`` (PNG drawing). Devices and clusters live in
:mod:`rannc_py.hardware`; blocks come from :mod:`rannc_py.profiling.coarsen`.
"""
