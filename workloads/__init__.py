"""Models, datasets and workloads: what a site trains and how its data is split.

Used by the simulator and by site daemons; numpy-only unless a torch model is asked for."""
