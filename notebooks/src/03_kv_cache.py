# %% [markdown]
# # 03 · The KV cache, read from the real decoder outputs
#
# Attention needs every earlier token's key and value. Recomputing them for the whole sequence at
# every step costs O(S) work per new token; the KV cache keeps them instead. The decoder graph takes
# the cache in (`past_key_values.{i}.key/value`) and hands the grown one out (`present.{i}.*`); here
# the cache is plain numpy data, passed into each step and returned from it.
#
# Runs on the tiny checkpoint (set `MODEL_DIR` or `HF_DIR` for a real one).

# %%
# %matplotlib inline
import time

import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.cache import bytes_per_token
from qwen3vl_lab.steps import build_positions, decode_step, embed, prefill, tokenize
from qwen3vl_lab.viz import plot_kv_cache

model = notebook.open_model()
cfg = model.config.text
print(notebook.describe())

# %% [markdown]
# ## 1. What prefill leaves behind
#
# Per layer, keys and values of shape `(batch, kv_heads, T, head_dim)`, after q/k-norm and rotary
# position: exactly what later queries will be compared with. The size is
# `2 (K and V) x layers x kv_heads x head_dim x 4 bytes` per cached token.

# %%
ids = tokenize(model, "Write a haiku about caches.")  # (1, S)
S = ids.shape[1]
positions = build_positions(ids)
step = prefill(model, embed(model, ids), positions)
cache0 = step.cache
print(f"{cfg.num_hidden_layers} layers x keys {cache0.keys[0].shape} + values {cache0.values[0].shape}")
print(f"{bytes_per_token(cfg)} bytes per token x {cache0.length} tokens = {cache0.nbytes} bytes")
assert cache0.length == S and len(cache0.keys) == cfg.num_hidden_layers
assert cache0.nbytes == bytes_per_token(cfg) * S

# %% [markdown]
# ## 2. Decode: one token in, one position more
#
# Each step returns a new cache; the one passed in is left as it was (you can go back to it).

# %%
steps = [step]
tokens = []
for _ in range(8):
    token = steps[-1].logits.argmax(axis=-1)  # greedy, (1,)
    tokens.append(int(token[0]))
    steps.append(decode_step(model, token[:, None], steps[-1].cache, positions.rope_deltas))
cache = steps[-1].cache
print("lengths:", [s.cache.length for s in steps])
assert cache0.length == S, "the prefill cache was not changed by the decode steps"
assert [s.cache.length for s in steps] == list(range(S, S + 9))

# %% [markdown]
# The old entries never change: a decode step only appends the new token's key and value.

# %%
for layer in range(cfg.num_hidden_layers):
    assert np.array_equal(cache.keys[layer][:, :, :S], cache0.keys[layer])
    assert np.array_equal(cache.values[layer][:, :, :S], cache0.values[layer])
print("the first", S, "positions are bit-identical in every layer after 8 decode steps")

# %% [markdown]
# ## 3. Its growth, as recorded by the cache itself
#
# `cache.history` has one record per step: how many tokens it added, the length after it, and the
# bytes per layer. Prefill adds the whole prompt; each decode step adds one token.

# %% tags=["main-figure"]
plot_kv_cache(cache.history)

# %%
for r in cache.history:
    assert r.length == S + r.step and r.new_tokens == (S if r.kind == "prefill" else 1)
    assert r.layer_bytes == (2 * cfg.num_key_value_heads * cfg.head_dim * 4 * r.length,) * cfg.num_hidden_layers
print([(r.step, r.kind, r.new_tokens, r.length) for r in cache.history])

# %% [markdown]
# ## 4. The cache changes the cost, not the answer
#
# For every decode step, recompute the whole sequence from scratch (prompt + all tokens so far, no
# cache) and compare the next-token logits.

# %%
diffs = []
for k in range(1, len(steps)):
    seq = np.concatenate([ids, np.array([tokens[:k]])], axis=1)  # (1, S + k)
    fresh = prefill(model, embed(model, seq), build_positions(seq))
    diffs.append(float(np.abs(fresh.logits - steps[k].logits).max()))
print("max |cached - recomputed| per step:", [f"{d:.1e}" for d in diffs])
assert max(diffs) < 1e-4

# %% [markdown]
# What it saves: a decode step runs the decoder on 1 token; without the cache step k runs it on
# S + k tokens. (Timings on this machine, for illustration.)

# %%
token = np.array([[tokens[-1]]])
t0 = time.perf_counter()
for _ in range(5):
    decode_step(model, token, steps[-2].cache, positions.rope_deltas)
with_cache = (time.perf_counter() - t0) / 5
seq = np.concatenate([ids, np.array([tokens])], axis=1)
t0 = time.perf_counter()
for _ in range(5):
    prefill(model, embed(model, seq), build_positions(seq))
without = (time.perf_counter() - t0) / 5
print(f"decoder tokens per step: 1 with the cache, {seq.shape[1]} without; "
      f"{with_cache * 1e3:.1f} ms vs {without * 1e3:.1f} ms")

# %% [markdown]
# ## 5. On a real model
#
# The same formula for Qwen3-VL-2B (28 layers, 8 key/value heads, head_dim 128), in float32:

# %%
from qwen3vl_lab.config import parse_hf_config
from qwen3vl_lab.export.tiny import hf_config_dict

text_2b = parse_hf_config(hf_config_dict("2b")).text
per_token = bytes_per_token(text_2b)
print(f"{per_token / 1024:.0f} KiB per token; 4096 tokens -> {per_token * 4096 / 2**30:.2f} GiB")
assert per_token == 2 * 28 * 8 * 128 * 4

# %% [markdown]
# ## 6. Explore a generation
#
# The slider walks the decode steps: the newest token's attention over the cache, the top next
# tokens, and the cache length so far.

# %%
from qwen3vl_lab.viz import record_generation
from qwen3vl_lab.viz.widgets import GenerationExplorer

trace = record_generation(model, "Write a haiku about caches.", max_new_tokens=8)
assert trace.tokens.tolist() == tokens[:8]
explorer = GenerationExplorer(trace)
explorer

# %%
explorer.step.value = 5
assert explorer.figure.get_suptitle().startswith("generation step 5")
print("03_kv_cache: all checks passed")
