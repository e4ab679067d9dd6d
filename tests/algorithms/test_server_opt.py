import numpy as np
import pytest

from fedloom.algorithms.server_opt import ServerAdam, ServerSGD, make_server_opt


def w(x: float) -> dict[str, np.ndarray]:
    return {"p": np.array([x], dtype=np.float32)}


def test_sgd_lr_one_is_fedavg() -> None:
    opt = ServerSGD()
    out = opt.step(w(1.0), w(0.5))
    assert out["p"][0] == pytest.approx(1.5)
    assert out["p"].dtype == np.float32


def test_sgd_momentum_accumulates() -> None:
    opt = ServerSGD(lr=0.5, momentum=0.9)
    x = w(0.0)
    x = opt.step(x, w(1.0))  # m = -1 -> x = 0.5
    assert x["p"][0] == pytest.approx(0.5)
    x = opt.step(x, w(1.0))  # m = 0.9*-1 - 1 = -1.9 -> x = 0.5 + 0.95
    assert x["p"][0] == pytest.approx(1.45)


def test_adam_matches_reddi_update_without_bias_correction() -> None:
    opt = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    x = opt.step(w(0.0), w(2.0))  # g = -2: m = -0.2, v = 0.04 -> step = -0.2/0.2 = -1
    assert x["p"][0] == pytest.approx(0.1, rel=1e-5)
    x = opt.step(x, w(2.0))  # m = -0.38, v = 0.0796
    expected = 0.1 + 0.1 * 0.38 / (np.sqrt(0.0796) + 1e-8)
    assert x["p"][0] == pytest.approx(expected, rel=1e-5)


def test_adam_bias_correction_first_step_is_lr_sign() -> None:
    opt = ServerAdam(lr=0.1, bias_correction=True)
    x = opt.step(w(0.0), w(-3.0))
    assert x["p"][0] == pytest.approx(-0.1, rel=1e-5)


def test_snapshot_restore_reproduces_trajectory() -> None:
    a = ServerAdam(lr=0.05)
    x = w(0.0)
    for d in (1.0, -0.5, 2.0):
        x = a.step(x, w(d))
    state = a.snapshot()
    b = ServerAdam()
    b.restore(state)
    xa = a.step(x, w(0.7))
    xb = b.step(x, w(0.7))
    assert xa["p"][0] == xb["p"][0]
    # the snapshot is a copy, not a view of live state
    a.step(xa, w(5.0))
    c = ServerAdam()
    c.restore(state)
    assert c.step(x, w(0.7))["p"][0] == xb["p"][0]


def test_sgd_snapshot_roundtrip_and_kind_check() -> None:
    a = ServerSGD(lr=1.0, momentum=0.5)
    a.step(w(0.0), w(1.0))
    b = ServerSGD()
    b.restore(a.snapshot())
    assert b.step(w(0.0), w(1.0))["p"][0] == a.step(w(0.0), w(1.0))["p"][0]
    with pytest.raises(ValueError):
        ServerAdam().restore(a.snapshot())


def test_factory_and_bad_arguments() -> None:
    assert isinstance(make_server_opt("adam", {"lr": 0.1}), ServerAdam)
    assert isinstance(make_server_opt("sgd"), ServerSGD)
    with pytest.raises(ValueError):
        make_server_opt("rmsprop")
    with pytest.raises(ValueError):
        make_server_opt("sgd", {"nesterov": True})
    with pytest.raises(ValueError):
        ServerSGD(lr=0.0)
    with pytest.raises(ValueError):
        ServerSGD(momentum=1.0)
    with pytest.raises(ValueError):
        ServerAdam(beta1=1.2)
