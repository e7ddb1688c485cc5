"""Our top-level package `kernels` shares its name with a Hugging Face package that transformers probes for
(`is_kernels_available`). With our tree first on sys.path, transformers must still import and build models."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import kernels
assert kernels.__file__.startswith({root!r}), kernels.__file__
import transformers
from transformers import NemotronHConfig, NemotronHForCausalLM
cfg = NemotronHConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, hybrid_override_pattern="M*",
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
                      ssm_state_size=8, n_groups=2, intermediate_size=64)
model = NemotronHForCausalLM(cfg)
import torch
out = model(torch.tensor([[1, 2, 3]]))
print("ok", tuple(out.logits.shape))
"""


def test_transformers_imports_with_our_kernels_package():
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ok (1, 3, 64)" in res.stdout
