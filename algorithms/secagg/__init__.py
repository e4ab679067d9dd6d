"""Secure aggregation for asynchronous buffers ("cohort-sealed" double masking).

The pure maths and formats the cohort state machines use; nothing here does I/O or
reads a clock:

* ``field``: clipping, example weighting and the fixed-point encoding of a delta into
  Z_{2^32} (numpy ``uint32`` wrap-around), the capacity check, decoding of a sum;
* ``prg``: the ChaCha20 keystream that expands a 32-byte seed into a mask;
* ``shamir``: t-of-n secret sharing of 32-byte seeds over GF(2^521 - 1);
* ``masking``: self and pairwise masks, and the unmasking of a cohort's sum;
* ``bundle``: the plaintext share bundle one member seals to another (strict parser);
* ``keys``: the ``SecAggKeys`` seam (pair seeds, boxes, signatures) the nodes are given,
  implemented by ``transport.secagg_keys`` (roster keys) and ``federation.secagg_keys``
  (keys derived from a seed, for the simulator and in-memory runs).
"""
