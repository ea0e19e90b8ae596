"""The runtime: RaNNCModule and the executor of stage action lists."""
