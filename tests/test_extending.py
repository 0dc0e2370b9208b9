"""docs/design.md's "Extending" blocks work: a new rule aggregates through the server round,
a new codec travels through L-GreCo's wire format with error feedback, a new adapter type
is injected and trains only its factors."""

import re
import subprocess
import sys
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"

CHECKS = '''
import numpy as np
import torch
from torch import nn

from fedlowrank.adapters import exchange_state, inject_adapters
from fedlowrank.aggregation.round import RoundConfig, ServerRound
from fedlowrank.aggregation.state import LowRankState
from fedlowrank.compression import ErrorFeedback, decode_update, encode_update, size_table
from fedlowrank.compression.controller import LGreCoConfig

# The rule: one round through the core's server round, against a dense reference.
rng = np.random.default_rng(0)
start = {"fc.lora_U": np.zeros((12, 6)), "fc.lora_S": np.ones((1, 6)), "fc.lora_V": rng.normal(size=(9, 6))}
# Two of the client's six components are a thousand times smaller than the rest.
client = {"fc.lora_U": rng.normal(size=(12, 6)) * np.array([1, 1, 1, 1, 1e-3, 1e-3]), "fc.lora_S": np.ones((1, 6)),
          "fc.lora_V": rng.normal(size=(9, 6))}
clients = [client, client]
rnd = ServerRound(RoundConfig(rule="exact-pruned", rank=6, align=False), LowRankState(), start, 1)
for arrays in clients:
    rnd.add(arrays, 1.0)
got = rnd.finish().arrays
mean = sum(c["fc.lora_U"] @ c["fc.lora_V"].T for c in clients) / 2
u, s, vt = np.linalg.svd(mean)
s = np.where(s[:6] >= 0.01 * s[0], s[:6], 0.0)
assert np.allclose(got["fc.lora_U"] @ np.diag(got["fc.lora_S"][0]) @ got["fc.lora_V"].T, (u[:, :6] * s) @ vt[:6], atol=1e-6)
assert int((s == 0).sum()) == 2  # the two small components were pruned, the rest kept

# The codec: sizes for the allocator, and a round trip through the wire format.
LGreCoConfig(candidates=["none", "sign"], default="sign")
update = {"w": rng.normal(size=(8, 5)).astype(np.float32)}
assert size_table({"w": (8, 5)}, ["sign"])[0, 0] == 5 + 4  # 40 bits and one float32
payload, _ = encode_update(update, {"w": "sign"}, ErrorFeedback())
decoded = decode_update(payload, {"w": (8, 5)}, {"w": "sign"})["w"]
assert np.array_equal(np.sign(decoded), np.sign(update["w"])) and np.isclose(abs(decoded).max(), abs(update["w"]).mean())

# The adapter type: injected by type, only its factors train, the base never moves.
model = nn.Sequential(Projection(6, 4), nn.ReLU(), nn.Linear(4, 1))
base = model[0].weight.detach().clone()
inject_adapters(model, r"^0$", rank=2)
assert type(model[0]).__name__ == "SVDProjection"
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
x = torch.randn(16, 6)
for _ in range(3):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
assert torch.equal(model[0].base.weight, base)
assert set(exchange_state(model)) >= {"0.lora_U", "0.lora_S", "0.lora_V"}
assert torch.allclose(model[0](x), x @ (base + model[0].delta_weight()).T, atol=1e-5)
print("extending: ok")
'''


def test_the_documented_extensions_work_through_the_real_paths():
    section = DESIGN.read_text().split("## Extending", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    out = subprocess.run([sys.executable, "-c", "\n".join(blocks) + CHECKS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "extending: ok" in out.stdout, out.stderr[-3000:]
