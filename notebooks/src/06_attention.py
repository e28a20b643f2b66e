# %% [markdown]
# # 06 · Attention, from the ONNX model itself
#
# An export made with `--with_attentions` adds one output per layer, `attentions.{i}` of shape
# `(batch, heads, queries, keys)`: the softmax probabilities the decoder really used (tests check
# them against transformers' `output_attentions=True` within 1e-4). Row q says how much query token
# q took from each key token; rows sum to 1.
#
# Runs on the trained shapes model (`qwen3vl-lab make-tiny --trained`: a tiny Qwen3-VL trained to
# answer questions about `qwen3vl_lab.shapes.task` scenes), so section 3 can show attention that means
# something: the answer looks at the object. Set `MODEL_DIR` or `HF_DIR` for a real model (`HF_DIR`
# exports with attentions).

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.shapes.evaluate import keyword_attention
from qwen3vl_lab.steps import build_positions, embed, prefill
from qwen3vl_lab.viz import (
    plot_attention,
    plot_attention_grid,
    plot_attention_on_image,
    plot_attention_row,
    record_generation,
)

model = notebook.open_model(default="shapes")
notebook.require_attentions(model)
cfg = model.config.text
print(notebook.describe(default="shapes"))

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
# ## 3. Attention to an image: the answer looks at the object
#
# A fresh shapes scene (96 x 96 pixels, one object) and a question about it. Each of the 9 image
# tokens stands for one 32 x 32-pixel cell, so the newest token's attention to the image tokens can
# be laid back onto the picture. Decode step 1 is the query "A", whose logits predict the shape.

# %%
scene, objects = shapes.make_scene(3, n_objects=1)
qa = shapes.question_answer_pairs(objects, kinds=["shape"])[0]
print(f"scene: {shapes.describe_scene(objects)} | Q: {qa.question!r} -> expected {qa.answer!r}")
image_trace = record_generation(model, qa.question, images=[scene], max_new_tokens=4)
print("generated:", image_trace.labels[image_trace.prompt_length:])
weights = image_trace.image_attention(step=1, layer=cfg.num_hidden_layers - 1)  # (rows, cols), mean over heads
cells = image_trace.image_cells()[0][0]
row = image_trace.attention_row(1, cfg.num_hidden_layers - 1).mean(axis=0)  # (T,)
print(f"{cells.size} image cells hold {row[cells].sum():.1%} of the attention of the newest token")
assert weights.shape == cells.shape and np.allclose(weights, row[cells])
plot_attention_on_image(image_trace.images[0], weights, title="last layer, mean over heads, decode step 1 (predicting the shape)")

# %% [markdown]
# A number for it: `shapes_eval.keyword_attention` feeds the expected answer up to its key word
# ("triangle" in "A triangle.") and reads, at the position that predicts that word, which share of
# each head's image attention falls on the object's cell. Spread evenly, the share would be the
# cell's share of the area, 1/9 = 11%.

# %%
ka = keyword_attention(model, scene, qa)
layer_share, head_share = ka.layer_share(), ka.object_share()  # (L,), (L, heads)
best_layer = int(layer_share.argmax())
best_head = np.unravel_index(head_share.argmax(), head_share.shape)
print(f"predicting {ka.keyword_token!r}: share of image attention on the object's cell {ka.object_cell} "
      f"(area share 1/9 = {1 / 9:.1%})")
print("  per layer (heads averaged):", ", ".join(f"{v:.1%}" for v in layer_share))
print(f"  best layer {best_layer}: {layer_share[best_layer]:.1%} | best head (layer, head) "
      f"{tuple(int(i) for i in best_head)}: {head_share[best_head]:.1%}")
if notebook.is_shapes():  # the trained model; a real one is free to look elsewhere
    assert layer_share[best_layer] > 0.5 and head_share[best_head] > 0.5, "the answer looks at the object"
plot_attention_on_image(image_trace.images[0], shapes.cell_grid(ka.image_attention[best_layer].mean(0)),
                        title=f"predicting {ka.keyword_token.strip()!r}: layer {best_layer}, mean over heads")

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
