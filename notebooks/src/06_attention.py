# %% [markdown]
# # 06 · Attention, from the ONNX model itself
#
# An export made with `--with_attentions` adds one output per layer, `attentions.{i}` of shape
# `(batch, heads, queries, keys)`: the softmax probabilities the decoder really used (tests check
# them against transformers' `output_attentions=True` within 1e-4). Row q says how much query token
# q took from each key token; rows sum to 1.
#
# Runs on the tiny checkpoint (set `MODEL_DIR` or `HF_DIR` for a real one; `HF_DIR` exports with
# attentions). A random-weight model's attention is unstructured, but the rules it obeys are not.

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab import notebook
from qwen3vl_lab.steps import build_positions, embed, prefill
from qwen3vl_lab.viz import (plot_attention, plot_attention_grid, plot_attention_on_image, plot_attention_row,
                             record_generation)

model = notebook.open_model()
notebook.require_attentions(model)
cfg = model.config.text
print(notebook.describe())

# %%
trace = record_generation(model, "The cat sat on the mat because it was tired.", max_new_tokens=6)
S = trace.prompt_length
print(f"{S} prompt tokens, generated {trace.labels[S:]}")

# %% [markdown]
# ## 1. The prompt: every layer and head
#
# At prefill each of the S prompt tokens is a query over the S prompt tokens. The upper triangle is
# empty: a token never sees the ones after it (causal mask).

# %% tags=["main-figure"]
plot_attention_grid(trace.attentions[0], trace.labels)

# %%
for layer in range(cfg.num_hidden_layers):
    a = trace.layer_attention(0, layer)  # (heads, S, S)
    assert a.shape == (cfg.num_attention_heads, S, S)
    assert np.allclose(a.sum(axis=-1), 1.0, atol=1e-5), "each row is a probability distribution"
    assert np.abs(np.triu(a, k=1)).max() == 0.0, "no attention to future tokens"
assert np.allclose(trace.layer_attention(0, 0)[:, 0, 0], 1.0), "the first token can only attend to itself"
print("rows sum to 1, upper triangles are 0, token 0 attends only to itself")

# %% [markdown]
# One head, with token labels:

# %%
plot_attention(trace.layer_attention(0, 0), trace.labels, head=0, title="prefill, layer 0, head 0")

# %% [markdown]
# ## 2. A generated token looks back
#
# At decode step k the only query is the newest token, and its keys are everything in the cache:
# one row of `S + k` probabilities per head.

# %%
step = 4
row = trace.attention_row(step, layer=cfg.num_hidden_layers - 1)  # (heads, S + step)
q = trace.query_index(step)
plot_attention_row(row, trace.labels, query=trace.labels[q])

# %% [markdown]
# The same row comes out of a full recompute: feed the whole sequence without a cache and take the
# last query's row. (This is why caching is exact: the new token's attention needs only the old
# keys and values.)

# %%
seq = trace.sequence[None, : q + 1]  # (1, S + step)
full = prefill(model, embed(model, seq), build_positions(seq))
recomputed = full.attentions[-1][0, :, -1, :]  # (heads, S + step)
err = np.abs(recomputed - row).max()
print(f"max |decode-step row - recomputed row| = {err:.1e}")
assert row.shape == (cfg.num_attention_heads, q + 1) and err < 1e-5

# %% [markdown]
# Grouped-query attention: query heads share key/value heads (`num_attention_heads /
# num_key_value_heads` queries per kv head), but each query head still has its own pattern.

# %%
group = cfg.num_attention_heads // cfg.num_key_value_heads
print(f"{cfg.num_attention_heads} query heads share {cfg.num_key_value_heads} key/value heads ({group} each)")
prefill_attn = trace.layer_attention(0, 0)
assert not np.allclose(prefill_attn[0], prefill_attn[1]), "heads sharing a kv head still attend differently"

# %% [markdown]
# ## 3. Attention to an image
#
# With an image in the prompt, the newest token's attention to the image tokens can be laid back
# onto the image: each image token stands for a 32 x 32-pixel cell.

# %%
image_trace = record_generation(model, "Who is this?", images=[notebook.sample_image()], image_size=(320, 256),
                                max_new_tokens=4)
weights = image_trace.image_attention(step=3, layer=cfg.num_hidden_layers - 1)  # (rows, cols), mean over heads
cells = image_trace.image_cells()[0][0]
row = image_trace.attention_row(3, cfg.num_hidden_layers - 1).mean(axis=0)  # (T,)
print(f"{cells.size} image cells hold {row[cells].sum():.1%} of the attention of the newest token")
assert weights.shape == cells.shape and np.allclose(weights, row[cells])
plot_attention_on_image(image_trace.images[0], weights, title="last layer, mean over heads, decode step 3")

# %% [markdown]
# ## 4. Explore
#
# Pick a layer and a head ("mean" averages the heads). Rows 0 to S-1 come from prefill, each row
# after that from one decode step.

# %%
from qwen3vl_lab.viz.widgets import AttentionExplorer

explorer = AttentionExplorer(trace)
explorer

# %%
explorer.layer.value = cfg.num_hidden_layers - 1
explorer.head.value = 1
assert "head 1" in explorer.figure.axes[0].get_title()
assert np.allclose(trace.full_attention(cfg.num_hidden_layers - 1)[1, q, : q + 1], trace.attention_row(step, -1)[1])
print("06_attention: all checks passed")
