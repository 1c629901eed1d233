"""The torch side of the benchmarks, run by the peer interpreter (torch, torchcfm, torchdyn; no JAX).

    PEER_PYTHON benchmarks/peer_torch.py train_step '{"batch": 256, "width": 256, ...}' data.npz
    PEER_PYTHON benchmarks/peer_torch.py sample '{"rtol": 1e-5, ...}' weights.npz

Prints one JSON line: seconds per call (median of interleaved repeats) and what was measured.
``data.npz`` holds x0/x1 batches ([k, batch, 2] each); ``weights.npz`` holds an fmjax MLP's weights
(hidden{i}_kernel/bias, out_kernel/bias, kernels [in, out]) and the points x0 to push.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from _timing import interleaved  # run as a script: benchmarks/ is on sys.path; _timing has no JAX


def mlp(dim: int, width: int, depth: int) -> torch.nn.Sequential:
    layers, fan_in = [], dim + 1
    for _ in range(depth):
        layers += [torch.nn.Linear(fan_in, width), torch.nn.SELU()]
        fan_in = width
    return torch.nn.Sequential(*layers, torch.nn.Linear(fan_in, dim))


def load_weights(net: torch.nn.Sequential, arrays) -> None:
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    names = [f"hidden{k}" for k in range(len(linears) - 1)] + ["out"]
    with torch.no_grad():
        for layer, name in zip(linears, names, strict=True):
            layer.weight.copy_(torch.from_numpy(np.asarray(arrays[f"{name}_kernel"]).T.copy()))
            layer.bias.copy_(torch.from_numpy(np.asarray(arrays[f"{name}_bias"]).copy()))


def train_step(cfg, arrays):
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    x0s = torch.from_numpy(arrays["x0"])
    x1s = torch.from_numpy(arrays["x1"])

    def candidate(matcher):
        net = mlp(2, cfg["width"], cfg["depth"])
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
        counter = [0]

        def call():
            k = counter[0] % len(x0s)
            counter[0] += 1
            t, xt, ut = matcher.sample_location_and_conditional_flow(x0s[k], x1s[k])
            vt = net(torch.cat([xt, t[:, None]], dim=-1))
            loss = torch.mean((vt - ut) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return call

    times = interleaved(
        {
            "TorchCFM I-CFM": candidate(ConditionalFlowMatcher(sigma=0.0)),
            "TorchCFM OT-CFM (exact)": candidate(ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)),
        },
        repeats=cfg["repeats"],
        inner=cfg["inner"],
    )
    return {"seconds": times}


def sample(cfg, arrays):
    from torchdyn.core import NeuralODE

    net = mlp(2, cfg["width"], cfg["depth"])
    load_weights(net, arrays)
    counter = [0]

    class Field(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, t, x, *args, **kwargs):
            counter[0] += 1
            return self.model(torch.cat([x, t.expand(x.shape[0], 1)], dim=-1))

    node = NeuralODE(Field(net), solver="dopri5", sensitivity="adjoint", atol=cfg["atol"], rtol=cfg["rtol"])
    x0 = torch.from_numpy(arrays["x0"])
    span = torch.linspace(0, 1, 2)
    out = {}

    def call():
        with torch.no_grad():
            out["x1"] = node.trajectory(x0, t_span=span)[-1]

    counter[0] = 0
    call()
    nfe = counter[0]
    seconds = interleaved({"torchdyn": call}, repeats=cfg["repeats"], inner=1)["torchdyn"]
    return {"seconds": seconds, "nfe": nfe, "x1": out["x1"].numpy().tolist()}


def main():
    job, cfg, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    arrays = dict(np.load(path))
    result = {"train_step": train_step, "sample": sample}[job](cfg, arrays)
    from importlib.metadata import version

    result["versions"] = (
        f"torch {torch.__version__}, torchcfm {version('torchcfm')}, torchdyn {version('torchdyn')}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
