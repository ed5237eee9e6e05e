"""The public API used the way a typed application would; `mypy --strict` checks this file
(tests/test_typing.py)."""
import numpy as np
import numpy.typing as npt

import lstm_fast as lf


def forecast(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    model = lf.LSTM(x.shape[2], 16, num_layers=2, batch_first=True, seed=0)
    head = lf.Linear(16, 1, seed=0)
    opt = lf.optim.Adam([model.parameters(), head.parameters()], lr=1e-3)
    target = np.zeros((x.shape[0], 1), np.float32)
    with lf.threads(1):
        out, _, cache = model.forward_train(x)
        pred = head(out[:, -1])
        loss, g_pred = lf.mse_loss(pred, target)
        g_head = head.backward(out[:, -1], g_pred)
        g_out = np.zeros_like(out)
        g_out[:, -1] = g_head.input
        grads = model.backward(cache, g_out)
        lf.optim.clip_grad_norm([grads.params, g_head.params], 1.0)
        opt.step([grads.params, g_head.params])
    state = model.zero_state(x.shape[0])
    y_t, state = model.step(x[:, 0], state)
    result, (h_n, c_n) = model(x)
    print(f"loss {loss:.3f}, step output {y_t.shape}, h_n {h_n.shape}")
    return result


if __name__ == "__main__":
    forecast(np.random.default_rng(0).standard_normal((4, 10, 3)).astype(np.float32))
