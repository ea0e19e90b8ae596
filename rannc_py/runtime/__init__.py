"""The runtime: ``RaNNCModule`` and what it runs a plan with.

``module`` (the wrapper: first call traces, plans or loads a plan, places
parameters; later calls run the schedule), ``autoplan`` (what the job's ranks
measure and rank 0 plans), ``layout`` (explicit layouts and loaded plans
checked against the graph and the job), ``placement`` (this rank's stage
programs, one per model chunk it holds, and parameters), ``params`` (canonical names, materialising,
gathering and loading state), ``executor`` (a rank's action list over a
step, each action run by its stage's executor), ``stage`` (a stage program with its wire formats), ``routing`` (which
rows go to which replica, message tags), ``io`` (inputs in, outputs back),
``grads`` (bucketed gradient sums, held gradients, clipping), ``failure``
(one failing rank ends every rank), ``tensor_group`` (a model run by the
ranks of a tensor group over MPI; not planned yet).
"""
