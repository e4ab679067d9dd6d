"""Which tensor codec each wire message type travels with.

Deltas going up (``Update``, ``GossipShare``) use the ``up`` spec, models going down
(``ModelBroadcast``, ``TrainRequest``) the ``down`` spec, every other message ``control``.
The policy is keyed by message class, so the simulator and the daemons pick the same codec
for the same message.
"""

from __future__ import annotations

from fedloom.transport import wire
from fedloom.transport.tensors import CodecSpec

UPLINK_TYPES: tuple[type, ...] = (wire.Update, wire.GossipShare)
DOWNLINK_TYPES: tuple[type, ...] = (wire.ModelBroadcast, wire.TrainRequest)


class CodecPolicy:
    """The codec spec of each message type: ``up``, ``down`` or ``control`` (fp32 by default)."""

    __slots__ = ("_by_type", "control", "down", "up")

    def __init__(
        self,
        up: CodecSpec | None = None,
        down: CodecSpec | None = None,
        control: CodecSpec | None = None,
    ) -> None:
        self.up = CodecSpec() if up is None else up
        self.down = CodecSpec() if down is None else down
        self.control = CodecSpec() if control is None else control
        self._by_type: dict[type, CodecSpec] = {t: self.up for t in UPLINK_TYPES}
        self._by_type.update({t: self.down for t in DOWNLINK_TYPES})

    def spec_for(self, msg: object) -> CodecSpec:
        """The spec ``msg`` is encoded with (``control`` for any type not named above)."""
        return self._by_type.get(type(msg), self.control)
