# %% [markdown]
# # 05 · Why does the INT4 model talk differently? The INT4 doctor
#
# `qwen3vl-lab export --precision int4` turns the decoder's MatMul weights into onnxruntime
# `MatMulNBits` (4-bit blocks with one scale each). Usually the answers stay close to fp32; when an
# INT4 model talks gibberish, the doctor (`qwen3vl_lab.debug`) finds where:
#
# 1. **per step**: feed both models the same (fp32 greedy) tokens and compare their next-token
#    distributions (KL divergence, top-1 agreement);
# 2. **per layer**: tap every layer's outputs in both decoders and measure the error (SQNR);
# 3. **per weight**: unpack the 4-bit blocks and compare them with the fp32 weights;
# 4. **checklist**: known bugs of Qwen-VL ports (no q/k-norm, 1-D positions, DeepStack unwired, ...).
#
# Runs on the tiny checkpoint's fp32 and INT4 exports (set `MODEL_DIR` to an export with `cpu-fp32/`
# and `cpu-int4/`, or `HF_DIR`). A random tiny model is *less* robust to quantization than a trained
# one (nothing in it is redundant), so its INT4 copy drifts visibly: good for seeing the tools work.

# %%
# %matplotlib inline
import tempfile
from pathlib import Path

import numpy as np

from qwen3vl_lab import notebook
from qwen3vl_lab.debug import compare_layers, compare_weights, dequantize_with_onnxruntime, read_quantized
from qwen3vl_lab.debug import free_greedy, run_checklist, teacher_forced
from qwen3vl_lab.model import load_model
from qwen3vl_lab.viz import plot_int4_summary, plot_layer_divergence, plot_step_divergence

root = notebook.model_dir()
fp32 = load_model(root, "fp32")
int4 = load_model(root, "int4")
print(notebook.describe())
print("reference:", fp32.folder, "| test:", int4.folder)
prompt = "Write a haiku about the sea."

# %% [markdown]
# ## 1. The symptom: the two models generate different text
#
# Both decode greedily on their own; `first_divergence` is the first step where the token streams
# part (after that they are answering different prefixes, so everything differs).

# %%
run = free_greedy(fp32, int4, prompt, n_steps=12)
print("fp32:", repr(run.ref_text))
print("int4:", repr(run.test_text))
print("first divergence at step", run.first_divergence)

# %% [markdown]
# ## 2. Per step: teacher forcing
#
# To compare like with like, both models get the *same* tokens (fp32's greedy choices) and we
# compare their next-token distributions at every step. A model compared with itself gives KL 0 and
# 100 % agreement: the yardstick works.

# %%
forced = teacher_forced(fp32, int4, prompt, n_steps=12)
same = teacher_forced(fp32, fp32, prompt, n_steps=12)
print(f"int4: mean KL {forced.mean_kl:.4f} nats, top-1 agreement {forced.agreement:.0%}")
print(f"fp32 vs itself: max KL {same.kl.max():.1e}, agreement {same.agreement:.0%}")
assert (forced.kl >= 0).all() and forced.kl.max() > 1e-4, "int4 changes the distributions"
assert same.kl.max() < 1e-9 and same.agreement == 1.0
plot_step_divergence(forced)

# %% [markdown]
# ## 3. Per layer: where the error grows
#
# The decoder graph names every layer's attention output, MLP output and residual stream
# (`layers.{i}.attn_out`, `layers.{i}.mlp_out`, `layers.{i}.hidden`); the doctor adds them as extra
# outputs in both models and compares them over the prompt. SQNR = signal power / error power, in
# dB: higher is closer to fp32. Quantization error enters at every MatMul and accumulates down the
# residual stream.

# %%
layers = compare_layers(fp32, int4, prompt)
print(layers.table())
hidden = layers.series("hidden", "rel_error")
assert hidden[-1] > hidden[0], "the residual stream's error accumulates with depth"
self_layers = compare_layers(fp32, fp32, prompt)
assert np.isinf(self_layers.series("hidden", "sqnr_db")).all(), "fp32 against itself: no error at all"
plot_layer_divergence(layers)

# %% [markdown]
# ## 4. Per weight: the 4-bit blocks themselves
#
# Each `MatMulNBits` weight is stored as packed 4-bit integers plus one scale per block of 32 input
# rows. The doctor unpacks them in numpy; onnxruntime's own kernel (multiplying by the identity)
# gives the same matrix, so the unpacking is right.

# %%
qm = read_quantized(int4)[0]
print(f"{qm.name}: K x N = {qm.K} x {qm.N}, {qm.bits} bits, block {qm.block_size}, "
      f"packed {qm.packed.shape} uint8 + scales {qm.scales.shape}")
assert np.allclose(qm.dequantize(), dequantize_with_onnxruntime(qm), atol=1e-6)
weights = compare_weights(fp32, int4)
print(weights.table(n=6))

# %% [markdown]
# ## 5. The checklist, and a deliberately broken model
#
# The checklist tests known causes of INT4 (and port) gibberish. To see it catch something, break a
# copy of the fp32 export on purpose: skip q/k-norm in every layer (a real bug of some Qwen3 ports).

# %%
from qwen3vl_lab.debug import make_broken

checks = run_checklist(int4, reference=fp32)
print(checks.table())
broken = make_broken(fp32.folder, Path(tempfile.mkdtemp()) / "no-qk-norm", "no_qk_norm")
broken_checks = run_checklist(broken, precision="fp32")
print(broken_checks.item("qk_norm").status, "-", broken_checks.item("qk_norm").evidence)
assert checks.item("qk_norm").status == "pass" and broken_checks.item("qk_norm").status == "fail"

# %% [markdown]
# ## 6. Everything at once
#
# `diagnose` runs all of the above for a folder and returns one report (`report.render()` prints it
# all, `report.verdict()` the short findings). The figure puts the per-step and per-layer views side
# by side.

# %% tags=["main-figure"]
plot_int4_summary(forced, layers, title="tiny checkpoint: fp32 vs int4 (block 32, symmetric, accuracy_level 4)"
                  if notebook.is_tiny() else "fp32 vs int4")

# %%
from qwen3vl_lab.debug import diagnose

report = diagnose(int4, reference=fp32, prompts=[prompt], n_steps=8, weights=False)
print("\n".join(report.verdict()))
assert report.comparison.forced[0].tokens.tolist() == forced.tokens[:8].tolist()
print("05_int4_debugging: all checks passed")
