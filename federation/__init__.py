"""What both drivers share: config readers, parameter types, the node factory, seeds,
training protocols and the invariant checker. Imports algorithms, transport and topology;
never the simulator or the runtime."""
