# %% [markdown]
# # 06 · Attention, from the ONNX model itself
#
# **Questions this lesson answers** (try them before reading on):
#
# 1. In a 4-layer, 4-head model, what does each head look at when it reads a prompt with an image?
#    Which heads are **attention sinks** (most of their attention on the first token) or **previous-token
#    heads** -- the two patterns that fill large language models?
# 2. Grouped-query attention (GQA): 4 query heads, 2 key/value heads. What is shared, what is not?
# 3. When the answer says "triangle", one head puts nearly all its image attention on the triangle's cell.
#    Does the answer *need* that head? (An experiment, not a picture, answers that.)
#
# An export made with `--with_attentions` adds one output per layer, `attentions.{i}` of shape
# `(batch, heads, queries, keys)`: the softmax probabilities the decoder really used (tests check
# them against transformers' `output_attentions=True` within 1e-4). Row q says how much query token
# q took from each key token; rows sum to 1.
#
# Every picture here comes from the trained shapes model (`qwen3vl-lab make-tiny --trained`: a tiny
# Qwen3-VL trained to answer questions about `qwen3vl_lab.shapes.task` scenes) reading a scene it never
# saw: a random-weight model's attention is noise, and this one's answer can be checked. Set `MODEL_DIR` or
# `HF_DIR` for a real model (`HF_DIR` exports with attentions). Exercises:
# `qwen3vl_lab.apps.lessons.attention` (checks and reference solutions).

# %%
# %matplotlib inline
import numpy as np

from qwen3vl_lab.apps import notebook
from qwen3vl_lab.apps.lessons import attention as lesson
from qwen3vl_lab.generate import preprocess_visuals
from qwen3vl_lab.model import load_model
from qwen3vl_lab.shapes import task as shapes
from qwen3vl_lab.shapes.evaluate import answer, keyword_attention
from qwen3vl_lab.stats import format_accuracy
from qwen3vl_lab.steps import build_positions, deepstack_embeds, embed, encode_image, merge_vision, prefill
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
scene, objects = shapes.make_scene(3, n_objects=1)  # a fresh scene: one object
qa = shapes.question_answer_pairs(objects, kinds=["shape"])[0]
print(f"scene: {shapes.describe_scene(objects)} | Q: {qa.question!r} -> expected {qa.answer!r}")
trace = record_generation(model, qa.question, images=[scene], max_new_tokens=4)
S = trace.prompt_length
cells = trace.image_cells()[0][0]  # (3, 3) sequence index of each image token
first_img, last_img = int(cells.min()), int(cells.max())
print(f"{S} prompt tokens (image tokens {first_img}..{last_img}), generated {trace.labels[S:]}")
scene

# %% [markdown]
# ## 1. The prompt: every layer and head
#
# At prefill each of the S prompt tokens is a query over the S prompt tokens. In every thumbnail below,
# rows are queries (top to bottom), columns are keys (left to right), one colour scale from 0 to 1. What
# to look for:
#
# - the **diagonal**: a token attending to itself;
# - the line just **below the diagonal**: a *previous-token* head (each token reads the one before it);
# - the **first column**: an *attention sink* -- queries that have nothing useful to read park their
#   attention on the first token (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks");
# - the **green-marked columns**: the 9 image tokens;
# - the empty upper triangle: a token never sees the ones after it (causal mask).
#
# **Predict before you run.** Where will most heads of this tiny trained model put most of their attention:
# on the token itself, the previous token, the first token, or the image? Write it down, then run the
# next cells.

# %%
for layer in range(cfg.num_hidden_layers):
    a = trace.layer_attention(0, layer)  # (heads, S, S)
    assert a.shape == (cfg.num_attention_heads, S, S)
    assert np.allclose(a.sum(axis=-1), 1.0, atol=1e-5), "each row is a probability distribution"
    assert np.abs(np.triu(a, k=1)).max() == 0.0, "no attention to future tokens"
assert np.allclose(trace.layer_attention(0, 0)[:, 0, 0], 1.0), "the first token can only attend to itself"
print("rows sum to 1, upper triangles are 0, token 0 attends only to itself")

# %% [markdown]
# ### Exercise: head detectors
#
# ARENA's interpretability chapter starts the same way: write a score per head that says how much it
# behaves like a pattern. Both take one layer's prefill attention `(heads, S, S)` and return `(heads,)`:
# the attention each query q = 1 .. S-1 pays to key q - 1 (previous token) or to key 0 (first token),
# averaged over those queries (query 0 has no choice: it sees only itself). The checks run your functions
# on heads whose scores are known by construction and say where yours differ, with a hint.

# %%
def previous_token_score(attn: np.ndarray) -> np.ndarray:
    raise NotImplementedError  # your code here: (heads, S, S) -> (heads,)


def sink_score(attn: np.ndarray) -> np.ndarray:
    raise NotImplementedError  # your code here: (heads, S, S) -> (heads,)


lesson.check_previous_token_score(previous_token_score)
lesson.check_sink_score(sink_score)

# %% [markdown]
# The reference solutions (`lesson.previous_token_score??`), checked the same way, score every head; the
# share of the text queries' attention that goes to the image tokens is the third number.

# %%
assert lesson.check_previous_token_score(lesson.previous_token_score) and lesson.check_sink_score(lesson.sink_score)
scores = {}
for layer in range(cfg.num_hidden_layers):
    a = trace.layer_attention(0, layer)  # (heads, S, S)
    image = a[:, last_img + 1:, first_img:last_img + 1].sum(-1).mean(-1)  # text queries after the image
    for h, (p, s, i) in enumerate(zip(lesson.previous_token_score(a), lesson.sink_score(a), image)):
        scores[layer, h] = (float(p), float(s), float(i))
print("(layer, head): previous-token, first-token (sink), image share of the text queries")
for (layer, h), (p, s, i) in scores.items():
    print(f"  ({layer}, {h}): {p:.2f}  {s:.2f}  {i:.2f}")
best_prev, best_sink = max(v[0] for v in scores.values()), max(v[1] for v in scores.values())
if notebook.is_shapes():
    assert best_prev < 0.5 and best_sink < 0.5, "no head of this model is a clean previous-token head or sink"
    assert min(v[2] for v in scores.values()) > 0.25, "every head's text queries read the image a lot"

# %% [markdown]
# The answer to the prediction: **none of the big-model patterns, clearly.** No head scores above 0.5 as a
# previous-token head (best: the printed maximum) or as a sink; what every head does instead is read the
# image: from a quarter to over half of the text queries' attention goes to 9 image tokens. A 4-layer model
# trained on one question-answering task has no reason to grow the generic machinery of a language model;
# sinks, in the usual explanation, appear when a model trained on long varied text needs somewhere to put
# attention it does not want to use. Large language models do have them (Xiao et al. measured sinks in
# Llama-2, MPT, Falcon and Pythia): run this notebook with `HF_DIR` on a real checkpoint to look for them
# in Qwen3-VL. The thumbnails, with the three numbers under each title:

# %% tags=["main-figure"]
notes = {k: f"prev {p:.2f} sink {s:.2f} img {i:.2f}" for k, (p, s, i) in scores.items()}
plot_attention_grid(trace.attentions[0], trace.labels, notes=notes, kv_heads=cfg.num_key_value_heads,
                    span=(first_img, last_img, "the 9 image tokens"))

# %% [markdown]
# One head, with token labels:

# %%
plot_attention(trace.layer_attention(0, 2), trace.labels, head=2, title="prefill, layer 2, head 2")

# %% [markdown]
# ## 2. Grouped-query attention: what the heads share
#
# The titles above say `(kv 0)` or `(kv 1)`: with GQA, query heads 0 and 1 read the same keys and values
# (key/value head 0), heads 2 and 3 the other pair. Each head still has its own queries, so its own
# pattern; what is shared is the cache: only `num_key_value_heads` heads of keys and values are stored.

# %%
group = cfg.num_attention_heads // cfg.num_key_value_heads
cached = trace.cache_history[0].layer_shapes[0]  # keys of layer 0 after prefill: (B, kv_heads, S, head_dim)
print(f"{cfg.num_attention_heads} query heads share {cfg.num_key_value_heads} key/value heads ({group} each); "
      f"the cache holds keys {cached} per layer, not (1, {cfg.num_attention_heads}, {S}, {cfg.head_dim})")
assert cached == (1, cfg.num_key_value_heads, S, cfg.head_dim)
prefill_attn = trace.layer_attention(0, 0)
assert not np.allclose(prefill_attn[0], prefill_attn[1]), "heads sharing a kv head still attend differently"

# %% [markdown]
# ## 3. A generated token looks back
#
# At decode step k the only query is the newest token, and its keys are everything in the cache: one row
# of `S + k` probabilities per head. Step 1's query is "A", whose logits predict the shape.

# %%
step = 1
row = trace.attention_row(step, layer=cfg.num_hidden_layers - 1)  # (heads, S + step)
q = trace.query_index(step)
plot_attention_row(row, trace.labels, query=trace.labels[q])

# %% [markdown]
# The same row comes out of a full recompute: run the whole sequence (image included) without a cache and
# take the last query's row. (This is why caching is exact: the new token's attention needs only the old
# keys and values.)

# %%
visuals = preprocess_visuals(model, [scene])
feats = encode_image(model, visuals.pixel_values, visuals.image_grid_thw)
seq = trace.sequence[None, : q + 1]  # (1, S + step): the prompt, then the tokens fed back
image_id = model.config.image_token_id
full = prefill(model, merge_vision(embed(model, seq), seq, feats, image_id),
               build_positions(seq, visuals.image_grid_thw, image_token_id=image_id,
                               spatial_merge_size=model.config.vision.spatial_merge_size),
               deepstack=deepstack_embeds(seq, feats, image_id))
recomputed = full.attentions[-1][0, :, -1, :]  # (heads, S + step)
err = np.abs(recomputed - row).max()
print(f"max |decode-step row - recomputed row| = {err:.1e}")
assert row.shape == (cfg.num_attention_heads, q + 1) and err < 1e-5

# %% [markdown]
# ## 4. Attention to the image: the answer looks at the object
#
# Each of the 9 image tokens stands for one 32 x 32-pixel cell, so the newest token's attention to the
# image tokens can be laid back onto the picture.

# %%
weights = trace.image_attention(step=1, layer=cfg.num_hidden_layers - 1)  # (rows, cols), mean over heads
mean_row = row.mean(axis=0)  # (T,)
print(f"{cells.size} image cells hold {mean_row[cells].sum():.1%} of the attention of the newest token")
assert weights.shape == cells.shape and np.allclose(weights, mean_row[cells])
plot_attention_on_image(trace.images[0], weights,
                        title="last layer, mean over heads, decode step 1 (predicting the shape)")

# %% [markdown]
# A number for it: `shapes_eval.keyword_attention` feeds the expected answer up to its key word
# ("triangle" in "A triangle.") and reads, at the position that predicts that word, which share of
# each head's image attention falls on the object's cell. Spread evenly, the share would be the
# cell's share of the area, 1/9 = 11%.

# %%
ka = keyword_attention(model, scene, qa)
layer_share, head_share = ka.layer_share(), ka.object_share()  # (L,), (L, heads)
best_layer = int(layer_share.argmax())
best_head = tuple(int(i) for i in np.unravel_index(head_share.argmax(), head_share.shape))
least_head = tuple(int(i) for i in np.unravel_index(head_share.argmin(), head_share.shape))
print(f"predicting {ka.keyword_token!r}: share of image attention on the object's cell {ka.object_cell} "
      f"(area share 1/9 = {1 / 9:.1%})")
print("  per layer (heads averaged):", ", ".join(f"{v:.1%}" for v in layer_share))
print(f"  best head (layer, head) {best_head}: {head_share[best_head]:.1%} | "
      f"least: {least_head}: {head_share[least_head]:.1%}")
if notebook.is_shapes():  # the trained model; a real one is free to look elsewhere
    assert layer_share[best_layer] > 0.5 and head_share[best_head] > 0.5, "the answer looks at the object"
plot_attention_on_image(trace.images[0], shapes.cell_grid(ka.image_attention[best_head[0], best_head[1]]),
                        title=f"predicting {ka.keyword_token.strip()!r}: head {best_head} alone")

# %% [markdown]
# ## 5. Does the answer need that head? An ablation
#
# Attention says where a head *reads*, not whether the answer *uses* what it read. The test is to remove
# the head and see whether the answer changes: `lesson.ablate_heads` copies the fp32 export with the head's
# output multiplied by zero before `o_proj` (its `head_dim` columns of the concatenated heads), nothing else
# changed. A control makes the test fair: remove the head that looks *least* at the object too.
#
# **Predict before you run.** Zero the best-looking head: do the shape and colour answers break? Zero the
# least-looking head: do they survive?

# %%
N_SCENES = 4  # held-out scenes; the shape and colour questions of each
ablated = {f"without head {h}": load_model(lesson.ablate_heads(model.folder, notebook.cache_dir() / "06-ablate", [h]))
           for h in (best_head, least_head)}
questions = [(img, q) for img, objs in shapes.heldout_set(N_SCENES)
             for q in shapes.question_answer_pairs(objs, kinds=["shape", "colour"])]
correct = {}
for name, m in {"all heads": model, **ablated}.items():
    said = [answer(m, img, q.question) for img, q in questions]
    correct[name] = sum(s == q.answer for s, (_, q) in zip(said, questions))
    print(f"{name:22s} {format_accuracy(correct[name], len(questions))}   e.g. {said[:3]}")
if notebook.is_shapes():
    n = len(questions)
    assert correct["all heads"] >= 0.8 * n
    assert all(c <= correct["all heads"] - 0.4 * n for c in list(correct.values())[1:]), "either head breaks it"

# %% [markdown]
# Both ablations break the answers, the control as badly as the head that finds the object. So the
# ablation does **not** back the story "this head finds the object, and the answer comes from it": in a
# model with 4 heads a layer, every head's output carries something the later layers rely on (at the very
# least its average contribution), and zeroing any of them derails the model. What the pictures above show
# is a correlation -- the head reads the object's cell when the shape is predicted -- not a mechanism.
# Finer experiments separate the two: *mean* ablation (replace the head's output by its average over many
# prompts, so only the prompt-specific part is removed) or *activation patching* (copy the head's output
# from a scene with another shape and see whether the answer follows), as in ARENA's chapter on indirect
# object identification.
#
# ## 6. Explore
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
